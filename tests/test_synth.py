"""Synthetic CelebA, in both styles: the release layout and formats, read back without the project's
parsers, and modes that a small classifier separates at 64x64 while faces within a mode still differ."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dcgan_dist.config import DataConfig
from dcgan_dist.data.build.cli import main
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.data.prepare import resolve_source

COUNT, MODES = 400, 8


@pytest.fixture(scope="module", params=["photo", "flat"])
def synth(tmp_path_factory, request) -> Path:
    return write_synthetic_celeba(tmp_path_factory.mktemp(request.param), COUNT, modes=MODES, seed=3, style=request.param)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_release_layout_and_text_formats(synth):
    images = sorted((synth / "img_align_celeba").iterdir())
    assert [p.name for p in images] == [f"{i:06d}.jpg" for i in range(1, COUNT + 1)]
    for p in images[:: COUNT // 10]:
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (178, 218))

    partition = [line.split(" ") for line in lines(synth / "list_eval_partition.txt")]
    assert [name for name, _ in partition] == [p.name for p in images]
    codes = [int(code) for _, code in partition]
    assert codes == sorted(codes)  # split by id ranges, as the official partition is
    counts = Counter(codes)
    assert counts[0] == round(COUNT * 162770 / 202599) and counts[1] == round(COUNT * 19867 / 202599)
    assert counts[2] == COUNT - counts[0] - counts[1]

    attr = lines(synth / "list_attr_celeba.txt")
    assert attr[0] == str(COUNT) and attr[1].endswith(" ") and len(attr[1].split()) == 40
    assert attr[1].split()[0] == "5_o_Clock_Shadow" and attr[1].split()[-1] == "Young"
    row = re.compile(r"\d{6}\.jpg( (-1| 1)){40}")  # right-aligned width 2, single spaces, as released
    assert all(row.fullmatch(line) for line in attr[2:]) and len(attr) == COUNT + 2

    landmarks = lines(synth / "list_landmarks_align_celeba.txt")
    assert landmarks[0] == str(COUNT) and len(landmarks[1].split()) == 10
    assert all(len(line.split()) == 11 for line in landmarks[2:]) and len(landmarks) == COUNT + 2
    bbox = lines(synth / "list_bbox_celeba.txt")
    assert bbox[1] == "image_id x_1 y_1 width height" and all(len(line.split()) == 5 for line in bbox[2:])

    assert json.loads((synth / "synth.json").read_text())["modes"] == MODES
    meta = json.loads((synth / "synth.json").read_text())
    assert (meta["count"], meta["seed"], meta["tool"].split()[0], len(meta["mode_names"])) == (COUNT, 3, "dcgan_dist", MODES)
    assert meta["style"] == synth.name.rstrip("0123456789")  # the fixture's folder is named after its style


def test_modes_are_balanced_identities_and_attributes_match_the_drawing(synth):
    identity = dict(line.split(" ") for line in lines(synth / "identity_CelebA.txt"))
    modes = Counter(int(v) for v in identity.values())
    assert sorted(modes) == list(range(MODES)) and set(modes.values()) == {COUNT // MODES}
    names = lines(synth / "list_attr_celeba.txt")[1].split()
    rows = {line.split()[0]: dict(zip(names, line.split()[1:])) for line in lines(synth / "list_attr_celeba.txt")[2:]}
    meta = json.loads((synth / "synth.json").read_text())
    for name, mode in identity.items():  # every face of a mode shows the mode's glasses, and only those
        assert (rows[name]["Eyeglasses"] == "1") == ("glasses" in meta["mode_names"][int(mode)])


def thumbnails(synth: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image as torchvision's Resize(64) + CenterCrop(64), and its mode."""
    to_64 = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.PILToTensor()])
    identity = [int(line.split(" ")[1]) for line in lines(synth / "identity_CelebA.txt")]
    images = []
    for i in range(1, COUNT + 1):
        with Image.open(synth / "img_align_celeba" / f"{i:06d}.jpg") as im:
            images.append(to_64(im.convert("RGB")).float() / 255)
    return torch.stack(images), torch.tensor(identity)


def test_a_small_classifier_separates_modes_at_64px_and_faces_vary_within_a_mode(synth):
    x, y = thumbnails(synth)
    train, held_out = slice(0, COUNT // 2), slice(COUNT // 2, COUNT)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, MODES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention
    try:
        for _ in range(40):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[train]), y[train]).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    accuracy = (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
    # photo faces vary widely within a mode on purpose (exposure, light, skin, shirt, background), so
    # 200 training faces separate them less well; chance is 1/8
    assert accuracy >= (0.97 if json.loads((synth / "synth.json").read_text())["style"] == "flat" else 0.88)

    for mode in range(MODES):  # within a mode: no two faces alike, clearly above JPEG noise
        faces = x[y == mode].flatten(1)
        distances = torch.cdist(faces, faces)[~torch.eye(len(faces), dtype=torch.bool)]
        assert distances.min().item() > 2.0


def test_same_seed_same_files_other_seed_other_faces(synth, tmp_path):
    style = json.loads((synth / "synth.json").read_text())["style"]
    again = write_synthetic_celeba(tmp_path / "again", COUNT, modes=MODES, seed=3, style=style)
    other = write_synthetic_celeba(tmp_path / "other", 20, modes=MODES, seed=4, style=style)
    for name in ("list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt",
                 "list_landmarks_align_celeba.txt", "img_align_celeba/000001.jpg", "img_align_celeba/000400.jpg"):
        assert (again / name).read_bytes() == (synth / name).read_bytes()
    assert (other / "img_align_celeba/000001.jpg").read_bytes() != (synth / "img_align_celeba/000001.jpg").read_bytes()


def test_cli_synth_and_bad_arguments(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--count", "12", "--modes", "3", "--seed", "1"]) == 0
    assert len(list((tmp_path / "s/img_align_celeba").glob("*.jpg"))) == 12
    assert json.loads((tmp_path / "s/synth.json").read_text())["modes"] == 3
    assert main(["synth", "--out", str(tmp_path / "t"), "--count", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "dcgan-shards: error: count: got 0, expected 1 to 999999 (six-digit CelebA file names)"
    with pytest.raises(ValueError, match="modes: got 0"):
        write_synthetic_celeba(tmp_path / "u", 5, modes=0)
    with pytest.raises(ValueError, match="style: got 'sketch', expected one of photo, flat"):
        write_synthetic_celeba(tmp_path / "v", 5, style="sketch")
    assert main(["synth", "--out", str(tmp_path / "f"), "--count", "2", "--style", "flat"]) == 0
    assert json.loads((tmp_path / "f/synth.json").read_text())["style"] == "flat"
    assert np.asarray(Image.open(tmp_path / "s/img_align_celeba/000001.jpg")).std() > 10  # a drawing, not a blank


def test_data_source_synthetic_is_built_once_under_shards_then_reused(tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.chdir(tmp_path)
    accelerator = Accelerator(cpu=True)
    data = DataConfig(source="synthetic", synthetic_count=30, synthetic_modes=3)
    source = resolve_source(data, 5, accelerator)
    assert source == str(Path("shards/synthetic-photo1-30x3/celeba64"))
    meta = json.loads(Path("shards/synthetic-photo1-30x3/celeba/synth.json").read_text())
    assert (meta["count"], meta["modes"], meta["seed"], meta["style"]) == (30, 3, 5, "photo")
    manifest = json.loads((Path(source) / "manifest.json").read_text())
    assert manifest["source"]["synthetic"] == meta and manifest["totals"]["samples"] == 30
    written = (Path(source) / "manifest.json").stat().st_mtime_ns
    assert resolve_source(data, 5, accelerator) == source
    assert (Path(source) / "manifest.json").stat().st_mtime_ns == written  # not rebuilt
    flat = resolve_source(DataConfig(source="synthetic", synthetic_count=30, synthetic_modes=3, synthetic_style="flat"),
                          5, accelerator)
    assert flat == str(Path("shards/synthetic-flat1-30x3/celeba64"))  # another style: its own folder
    assert json.loads(Path("shards/synthetic-flat1-30x3/celeba/synth.json").read_text())["style"] == "flat"
    assert resolve_source(DataConfig(source="/data/shards"), 5, accelerator) == "/data/shards"
