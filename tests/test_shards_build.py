"""dcgan-shards build and verify, checked against the source files read independently: the partition file
parsed here, tars read back with `tarfile` and `webdataset`, pixels computed with torchvision directly."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torchvision import transforms

from conftest import shared_path
from dcgan_dist.data.build import ShardError
from dcgan_dist.data.build.cli import main
from dcgan_dist.data.build.pack import STAGING_NAME, build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.data.build.verify import verify_shards
from dcgan_dist.config import ConfigError, DataConfig
from dcgan_dist.data import make_batch_source
from dcgan_dist.data.manifest import JOURNAL_NAME, MANIFEST_NAME

COUNT = 150
LISTS = ("list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt",
         "list_landmarks_align_celeba.txt", "list_bbox_celeba.txt", "synth.json")
SPLIT_CODES = {"0": "train", "1": "valid", "2": "test"}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_synthetic_celeba(tmp_path_factory.mktemp("celeba"), COUNT, modes=5, seed=1)


@pytest.fixture(scope="module")
def built(release, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built")
    build_shards(release, out, shard_size=50, workers=2)
    return out


def partition(root: Path) -> dict[str, set[str]]:
    """Split -> image ids, straight from list_eval_partition.txt."""
    splits = defaultdict(set)
    for line in (root / "list_eval_partition.txt").read_text().splitlines():
        name, code = line.split()
        splits[SPLIT_CODES[code]].add(name.split(".")[0])
    return splits


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def samples(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """Split -> key -> extension -> bytes, from every shard the manifest names."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    found = {}
    for split, info in manifest["splits"].items():
        found[split] = defaultdict(dict)
        for shard in info["shards"]:
            for name, data in read_tar(out / shard["name"]).items():
                key, ext = name.split(".", 1)
                found[split][key][ext] = data
    return found


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def lab_expected(path: Path, crop: int | None = None) -> np.ndarray:
    """torchvision's Resize(64) + CenterCrop(64) of the full-resolution image, HWC uint8."""
    steps = ([transforms.CenterCrop(crop)] if crop else []) + [transforms.Resize(64), transforms.CenterCrop(64)]
    with Image.open(path) as im:
        return np.asarray(transforms.Compose(steps)(im.convert("RGB")))


def copy_release(release: Path, dest: Path) -> Path:
    shutil.copytree(release, dest)
    return dest


# ------------------------------------------------------------------------------------ the release folder

def test_release_build_matches_partition_labels_and_format(release, built):
    manifest = json.loads((built / MANIFEST_NAME).read_text())
    expected = partition(release)
    found = samples(built)
    for split in ("train", "valid", "test"):
        assert set(found[split]) == expected[split]
        assert manifest["splits"][split]["samples"] == len(expected[split])
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [50, 50, len(expected["train"]) - 100]
    assert manifest["splits"]["train"]["shards"][1]["name"] == "celeba64-train-000001.tar"
    assert manifest["totals"]["samples"] == COUNT and manifest["skipped"] == [] and manifest["missing"]["count"] == 0
    assert manifest["source"]["layout"] == "celeba-release"
    assert manifest["source"]["synthetic"] == json.loads((release / "synth.json").read_text())
    assert (manifest["format"], manifest["size"]) == ("png", 64)

    for shard in manifest["splits"]["valid"]["shards"] + manifest["splits"]["train"]["shards"][:1]:
        path = built / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)  # by key, then extension
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == \
            {(0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
        assert {m.name.split(".", 1)[1] for m in members} == {"json", "png"} and len(members) == 2 * shard["samples"]

    names = (release / "list_attr_celeba.txt").read_text().splitlines()[1].split()
    attributes = {line.split()[0][:6]: line.split()[1:] for line in
                  (release / "list_attr_celeba.txt").read_text().splitlines()[2:]}
    identity = dict(line.replace(".jpg", "").split() for line in (release / "identity_CelebA.txt").read_text().splitlines())
    landmarks = {line.split()[0][:6]: [int(v) for v in line.split()[1:]] for line in
                 (release / "list_landmarks_align_celeba.txt").read_text().splitlines()[2:]}
    bbox = {line.split()[0][:6]: [int(v) for v in line.split()[1:]] for line in
            (release / "list_bbox_celeba.txt").read_text().splitlines()[2:]}
    for split, by_key in found.items():
        for key, parts in by_key.items():
            label = json.loads(parts["json"])
            assert (label["id"], label["split"], label["identity"]) == (key, split, int(identity[key]))
            assert label["attributes"] == {n: int(v == "1") for n, v in zip(names, attributes[key])}
            assert (label["landmarks"], label["bbox"]) == (landmarks[key], bbox[key])


def test_every_png_equals_torchvision_resize_and_center_crop(release, built):
    for by_key in samples(built).values():
        for key, parts in by_key.items():
            with Image.open(io.BytesIO(parts["png"])) as im:
                assert im.mode == "RGB"
                np.testing.assert_array_equal(np.asarray(im), lab_expected(release / "img_align_celeba" / f"{key}.jpg"))


def test_webdataset_reads_the_shards(built):
    manifest = json.loads((built / MANIFEST_NAME).read_text())
    urls = [str(built / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False)]
    assert len(keys) == manifest["splits"]["train"]["samples"] and keys == sorted(keys)
    first = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("rgb8")))
    assert first["png"].shape == (64, 64, 3) and first["json"]["id"] == first["__key__"]


# ----------------------------------------------------------------------------------------- other layouts

def zip_of_images(release: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted((release / "img_align_celeba").iterdir()):
            zf.write(path, f"img_align_celeba/{path.name}")
        zf.writestr("__MACOSX/img_align_celeba/._000001.jpg", b"resource fork")  # ignored, as on real zips
    return dest


def release_with_zip(release: Path, root: Path) -> Path:
    root.mkdir()
    zip_of_images(release, root / "img_align_celeba.zip")
    for name in LISTS:
        shutil.copy(release / name, root / name)
    return root


def bare_zip(release: Path, root: Path) -> Path:
    root.mkdir()
    for name in LISTS:  # the lists beside the zip are used when they are there
        shutil.copy(release / name, root / name)
    return zip_of_images(release, root / "img_align_celeba.zip")


def torchvision_root(release: Path, root: Path) -> Path:
    shutil.copytree(release, root / "celeba")
    return root


def kaggle_csv(release: Path, root: Path) -> Path:
    """Kaggle's unzipped copy: images one folder deeper, lists as .csv with a header line."""
    shutil.copytree(release / "img_align_celeba", root / "img_align_celeba" / "img_align_celeba")
    rows = [line.split() for line in (release / "list_eval_partition.txt").read_text().splitlines()]
    (root / "list_eval_partition.csv").write_text("image_id,partition\n" + "".join(f"{a},{b}\n" for a, b in rows))
    attr = (release / "list_attr_celeba.txt").read_text().splitlines()
    (root / "list_attr_celeba.csv").write_text("\n".join(",".join(["image_id", *line.split()]) if i == 0 else
                                                         ",".join(line.split()) for i, line in enumerate(attr[1:])))
    return root


@pytest.mark.parametrize("make", [release_with_zip, bare_zip, torchvision_root, kaggle_csv])
def test_other_layouts_give_the_same_tars(make, release, built, tmp_path):
    source = make(release, tmp_path / "src")
    manifest = build_shards(source, tmp_path / "out", shard_size=50, workers=2)
    expected = partition(release)
    assert {s: manifest["splits"][s]["samples"] for s in expected} == {s: len(v) for s, v in expected.items()}
    if make is kaggle_csv:  # no landmarks, boxes or identities there: labels differ, pixels do not
        found = samples(tmp_path / "out")
        assert json.loads(found["test"][min(expected["test"])]["json"])["landmarks"] is None
        assert found["train"]["000001"]["png"] == samples(built)["train"]["000001"]["png"]
    else:
        assert tar_bytes(tmp_path / "out") == tar_bytes(built)


def test_plain_folder_gets_a_seeded_valid_split(release, tmp_path):
    folder = tmp_path / "faces"
    for i, path in enumerate(sorted((release / "img_align_celeba").iterdir())):
        (folder / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"part{i % 3}" / path.name)
    first = build_shards(folder, tmp_path / "a", valid_fraction=0.2, workers=1)
    assert first["source"]["layout"] == "image-folder"
    assert [first["splits"][s]["samples"] for s in ("train", "valid", "test")] == [COUNT - 30, 30, 0]
    again = samples(tmp_path / "a")
    other = build_shards(folder, tmp_path / "b", valid_fraction=0.2, workers=2, seed=1)
    assert set(samples(tmp_path / "b")["valid"]) != set(again["valid"])  # the seed chooses
    assert set(again["train"]) | set(again["valid"]) == {f"{i:06d}" for i in range(1, COUNT + 1)}
    assert json.loads(next(iter(again["valid"].values()))["json"])["attributes"] is None
    assert other["splits"]["valid"]["samples"] == 30


# ------------------------------------------------------------------------- determinism, resume, verify

def test_rebuild_is_byte_identical_and_rerun_keeps_complete_shards(release, built, tmp_path):
    build_shards(release, tmp_path / "one", shard_size=50, workers=1)
    assert tar_bytes(tmp_path / "one") == tar_bytes(built)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("*.tar")}
    log = []
    build_shards(release, tmp_path / "one", shard_size=50, workers=1, log=log.append)
    assert "kept 5 complete shards" in log[0]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("*.tar")} == mtimes

    build_shards(release, tmp_path / "one", shard_size=200, workers=1)  # other options: rebuilt, stale shards gone
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "celeba64-test-000000.tar", "celeba64-train-000000.tar", "celeba64-valid-000000.tar", MANIFEST_NAME]
    assert verify_shards(tmp_path / "one") == []


def test_interrupted_build_leaves_no_partial_shard_or_manifest_and_resumes(release, built, tmp_path):
    out = tmp_path / "out"

    def interrupt(message: str) -> None:
        if message.startswith("celeba64-train-000000.tar"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_shards(release, out, shard_size=50, workers=2, log=interrupt)
    assert not (out / MANIFEST_NAME).exists() and not list(out.rglob("*.tmp")) and not list(out.glob("*.tar"))
    staged = out / STAGING_NAME / "celeba64-train-000000.tar"  # the finished shard waits for the build to complete
    assert staged.read_bytes() == (built / "celeba64-train-000000.tar").read_bytes()
    with pytest.raises(ConfigError, match=r"holds shards but no manifest.json: an interrupted build\? run dcgan-shards"):
        make_batch_source(DataConfig(source=str(out)), batch_size=8, rank=0, world_size=1, seed=0)
    log = []
    build_shards(release, out, shard_size=50, workers=2, log=log.append)
    assert any(line.startswith("kept 1 complete shards") for line in log)
    assert tar_bytes(out) == tar_bytes(built) and verify_shards(out) == []
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".tar")) == [MANIFEST_NAME]


def test_a_failed_rebuild_leaves_the_previous_build_usable(release, tmp_path):
    """The previous manifest and the shards it names stay as they were until a new build completes."""
    source = copy_release(release, tmp_path / "src")
    (source / "img_align_celeba" / "000007.jpg").write_text("not a picture\n")
    out = tmp_path / "out"
    build_shards(source, out, shard_size=50, workers=2)  # skips 000007.jpg
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the same options under --strict: the kept shards' recorded skip is fatal, before anything is written
    with pytest.raises(ShardError, match=r"^img_align_celeba/000007\.jpg: not an image .*skipped by an earlier build"):
        build_shards(source, out, shard_size=50, workers=2, strict=True)
    # other options under --strict: new shards are finished (000001-000005), then 000007.jpg is fatal
    with pytest.raises(ShardError, match=r"^img_align_celeba/000007\.jpg: not an image .*\(--strict"):
        build_shards(source, out, fmt="raw", shard_size=5, workers=2, strict=True)
    assert (out / STAGING_NAME / "celeba64-train-000000.tar").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (JOURNAL_NAME, STAGING_NAME)} == before
    assert verify_shards(out) == []
    src = make_batch_source(DataConfig(source=str(out), workers=0), batch_size=8, rank=0, world_size=1, seed=0)
    assert src.format == "png" and len(list(src.batches(0))) == src.batches_per_epoch
    log = []  # the rebuild without --strict resumes from the shard it finished and then replaces the old build
    manifest = build_shards(source, out, fmt="raw", shard_size=5, workers=2, log=log.append)
    assert any(line.startswith("kept 1 complete shards") for line in log) and manifest["format"] == "npy"
    assert verify_shards(out) == []  # which also finds no shard of the old build left beside the new one
    assert not (out / STAGING_NAME).exists() and not (out / JOURNAL_NAME).exists()


def test_a_rebuild_adds_checksums_to_shards_built_without_them(release, built, tmp_path):
    out = shutil.copytree(built, tmp_path / "old")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            del entry["crc32"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert any("no per-member checksums" in p for p in verify_shards(out))
    log = []
    build_shards(release, out, shard_size=50, workers=2, log=log.append)
    assert not any(line.startswith("kept") for line in log)  # re-encoded: the old entries lack what is needed
    assert tar_bytes(out) == tar_bytes(built) and (out / MANIFEST_NAME).read_bytes() == (built / MANIFEST_NAME).read_bytes()


def test_command_line_edge_cases_are_one_line_errors_that_write_nothing(release, tmp_path, capsys):
    def build(source: Path, out: Path, *extra: str) -> str:
        assert main(["build", "--source", str(source), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dcgan-shards: error: ")
        return err[len("dcgan-shards: error: "):].rstrip("\n")

    source = copy_release(release, tmp_path / "src")
    partition = source / "list_eval_partition.txt"
    good = partition.read_bytes()
    partition.write_bytes(good.replace(b"000004.jpg 0", b"00\xe9004.jpg 0"))  # Latin-1, not UTF-8
    assert build(source, tmp_path / "out") == (f"{partition} line 4: not UTF-8 text (byte 0xe9), expected a CelebA "
                                               "list in plain text")
    partition.write_bytes(b"")
    assert build(source, tmp_path / "out") == f"{partition}: no rows, expected a line per image (an empty or placeholder file?)"
    partition.write_bytes(b"999999.jpg 0\n")  # lists no image that is there
    assert build(source, tmp_path / "out", "--allow-missing").startswith(f"{source}: no images to build from")
    assert not (tmp_path / "out").exists()
    partition.write_bytes(good)
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert build(source, taken) == f"{taken}: exists and is not a folder, expected a folder for the shards (--out)"
    assert build(source, taken / "shards").startswith(f"{taken / 'shards'}: cannot create the shard folder (")
    assert taken.read_text() == "mine"
    out = tmp_path / "no-manifest"
    out.mkdir()
    (out / "celeba64-train-000000.tar").write_bytes(b"")  # shards, and no manifest
    with pytest.raises(ConfigError, match=r"^config key 'data.source': .* holds shards but no manifest.json"):
        make_batch_source(DataConfig(source=str(out)), batch_size=8, rank=0, world_size=1, seed=0)


def test_verify_catches_a_flipped_byte_and_a_truncated_tar(built, tmp_path, capsys):
    assert verify_shards(built) == []
    assert main(["verify", str(built)]) == 0
    out = shutil.copytree(built, tmp_path / "copy")
    flipped = out / "celeba64-train-000001.tar"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = out / "celeba64-test-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:9000])
    problems = verify_shards(out)
    assert any(p.startswith("celeba64-train-000001.tar: sha256") for p in problems)
    assert any(p.startswith("celeba64-test-000000.tar: 9000 bytes") for p in problems)
    assert any(p.startswith("celeba64-test-000000.tar:") and "samples read" in p for p in problems)
    assert not any(p.startswith("celeba64-valid") for p in problems)
    assert main(["verify", str(out)]) == 1
    assert "celeba64-train-000001.tar: sha256" in capsys.readouterr().out
    assert main(["verify", str(tmp_path)]) == 2  # no manifest
    assert capsys.readouterr().err.startswith(f"dcgan-shards: error: {tmp_path / MANIFEST_NAME}: expected a shard manifest")


HELP_WITHOUT_TORCH = """
import sys
from dcgan_dist.data.build.cli import main
for argv in (["--help"], ["build", "--help"], ["verify", "--help"], ["synth", "--help"], ["build"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "torchvision", "webdataset", "PIL", "numpy") if m in sys.modules))
"""


def test_help_and_argument_errors_come_before_the_heavy_imports(tmp_path):
    """`dcgan-shards --help` answers without importing torch (seconds on a cold start)."""
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: dcgan-shards build" in done.stdout and "--format {png,jpg,raw}" in done.stdout
    assert "the following arguments are required: --source" in done.stderr


# ----------------------------------------------------------------------------------------------- bad input

def test_corrupt_inputs_are_skipped_and_reported(release, tmp_path, capsys):
    source = copy_release(release, tmp_path / "src")
    images = source / "img_align_celeba"
    (images / "000003.jpg").write_bytes(b"")
    (images / "000005.jpg").write_bytes((images / "000005.jpg").read_bytes()[:2000])
    (images / "000007.jpg").write_text("not a picture, a text file\n")
    shutil.copy(images / "000008.jpg", images / "999999.jpg")  # a good image the partition does not list
    assert main(["build", "--source", str(source), "--out", str(tmp_path / "out"), "--workers", "2"]) == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {f"img_align_celeba/{i}.jpg" for i in ("000003", "000005", "000007", "999999")}
    assert reasons["img_align_celeba/999999.jpg"] == "not listed in list_eval_partition.txt"
    assert reasons["img_align_celeba/000003.jpg"] == "empty file (0 bytes)"
    assert reasons["img_align_celeba/000005.jpg"].startswith("truncated image")
    assert reasons["img_align_celeba/000007.jpg"].startswith("not an image")
    assert manifest["totals"]["samples"] == COUNT - 3
    assert "000005" not in samples(tmp_path / "out")["train"]
    summary = capsys.readouterr().err.splitlines()[-1]
    assert summary.startswith("skipped 4 inputs: ") and summary.endswith(f"(each named in {tmp_path / 'out' / MANIFEST_NAME})")
    for part in ("1 empty file", "1 truncated image", "1 not an image", "1 not listed in list_eval_partition.txt"):
        assert part in summary

    with pytest.raises(ShardError, match=r"^img_align_celeba/999999\.jpg: not listed in list_eval_partition.txt "
                                         r"\(--strict makes skipped inputs fatal\)$"):
        build_shards(source, tmp_path / "strict", strict=True, workers=2)
    (images / "999999.jpg").unlink()
    with pytest.raises(ShardError, match=r"^img_align_celeba/000003\.jpg: empty file \(0 bytes\) \(--strict"):
        build_shards(source, tmp_path / "strict", strict=True, workers=2)
    assert not (tmp_path / "strict" / MANIFEST_NAME).exists() and not list((tmp_path / "strict").glob("*.tar*"))


def test_missing_files_fail_in_one_line_unless_allowed(release, tmp_path, capsys):
    source = copy_release(release, tmp_path / "src")
    for i in (2, 4, 9):
        (source / "img_align_celeba" / f"{i:06d}.jpg").unlink()
    assert main(["build", "--source", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dcgan-shards: error: 3 of 150 images listed in list_eval_partition.txt")
    assert "(first: 000002, 000004, 000009)" in err and "--allow-missing" in err
    assert not (tmp_path / "out").exists()
    manifest = build_shards(source, tmp_path / "out", allow_missing=True, workers=2)
    assert manifest["missing"] == {"count": 3, "first": ["000002", "000004", "000009"]}
    assert manifest["totals"]["samples"] == COUNT - 3


def test_duplicate_ids_are_an_error(release, tmp_path):
    source = copy_release(release, tmp_path / "src")
    shutil.copy(source / "img_align_celeba" / "000001.jpg", source / "img_align_celeba" / "000001.png")
    with pytest.raises(ShardError, match=r"duplicate image id '000001': img_align_celeba/000001\.jpg and "
                                         r"img_align_celeba/000001\.png"):
        build_shards(source, tmp_path / "out")
    (source / "img_align_celeba" / "000001.png").unlink()
    with open(source / "list_eval_partition.txt", "a") as f:
        f.write("000002.jpg 1\n")
    with pytest.raises(ShardError, match=rf"list_eval_partition.txt line {COUNT + 1}: duplicate image id '000002' "
                                         r"\(first on line 2\)"):
        build_shards(source, tmp_path / "out")


def test_malformed_lists_name_the_file_and_line(release, tmp_path):
    source = copy_release(release, tmp_path / "src")
    text = (source / "list_eval_partition.txt").read_text().replace("000004.jpg 0", "000004.jpg 7")
    (source / "list_eval_partition.txt").write_text(text)
    with pytest.raises(ShardError, match=r"list_eval_partition.txt line 4: expected '<image> <split: 0, 1 or 2>', "
                                         r"got '000004.jpg 7'"):
        build_shards(source, tmp_path / "out")
    shutil.copy(release / "list_eval_partition.txt", source / "list_eval_partition.txt")
    attr = (source / "list_attr_celeba.txt").read_text().splitlines()
    (source / "list_attr_celeba.txt").write_text("\n".join(attr[:-5]) + "\n")  # a truncated download
    with pytest.raises(ShardError, match=rf"list_attr_celeba.txt line 1: says {COUNT} rows, found {COUNT - 5}"):
        build_shards(source, tmp_path / "out")


def test_unrecognised_layout_lists_what_was_looked_for(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    assert main(["build", "--source", str(tmp_path / "notes"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for looked_for in ("img_align_celeba/", "img_align_celeba.zip", "celeba/img_align_celeba/", "a .zip file", ".jpg"):
        assert looked_for in err
    with pytest.raises(ShardError, match="not a readable zip"):
        (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 truncated")
        build_shards(tmp_path / "broken.zip", tmp_path / "out")


# ---------------------------------------------------------------------------------- formats and options

def test_raw_and_jpg_formats_and_face_crop(release, built, tmp_path):
    png = samples(built)
    build_shards(release, tmp_path / "raw", fmt="raw", workers=2)
    for key, parts in samples(tmp_path / "raw")["valid"].items():
        array = np.load(io.BytesIO(parts["npy"]), allow_pickle=False)
        assert array.dtype == np.uint8 and array.shape == (64, 64, 3) and array.flags.c_contiguous
        np.testing.assert_array_equal(array, np.asarray(Image.open(io.BytesIO(png["valid"][key]["png"]))))
    assert json.loads((tmp_path / "raw" / MANIFEST_NAME).read_text())["format"] == "npy"

    build_shards(release, tmp_path / "jpg", fmt="jpg", workers=2)
    for key, parts in samples(tmp_path / "jpg")["test"].items():
        decoded = np.asarray(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"), dtype=float)
        assert np.abs(decoded - lab_expected(release / "img_align_celeba" / f"{key}.jpg")).mean() < 3

    build_shards(release, tmp_path / "crop", crop=True, size=32, workers=2)
    manifest = json.loads((tmp_path / "crop" / MANIFEST_NAME).read_text())
    assert manifest["size"] == 32 and manifest["preprocessing"]["face_crop"]
    for key, parts in samples(tmp_path / "crop")["valid"].items():
        with Image.open(release / "img_align_celeba" / f"{key}.jpg") as im:
            face = transforms.Compose([transforms.CenterCrop(108), transforms.Resize(32)])(im.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(parts["png"]))), np.asarray(face))


def test_fast_decode_is_opt_in_and_recorded(release, built, tmp_path):
    manifest = build_shards(release, tmp_path / "fast", fast_decode=True, workers=2)
    assert manifest["preprocessing"]["decode"].startswith("JPEG draft")
    assert json.loads((built / MANIFEST_NAME).read_text())["preprocessing"]["decode"] == "full resolution"
    fast, exact = samples(tmp_path / "fast")["valid"], samples(built)["valid"]
    for key in fast:
        a, b = (np.asarray(Image.open(io.BytesIO(s[key]["png"])), dtype=float) for s in (fast, exact))
        assert a.shape == (64, 64, 3) and np.abs(a - b).mean() < 4


def test_bad_options_are_one_line_errors(release, tmp_path):
    for kwargs, message in ((dict(fmt="webp"), "format: got 'webp'"), (dict(shard_size=0), "shard_size: got 0"),
                            (dict(valid_fraction=1.0), "valid_fraction: got 1.0")):
        with pytest.raises(ShardError, match=message):
            build_shards(release, tmp_path / "out", **kwargs)


# ------------------------------------------------------------------------------------ the real sample

def test_shared_celeba_sample_builds_with_allow_missing(tmp_path):
    sample = shared_path("celeba-sample")
    with pytest.raises(ShardError, match=r"^201,399 of 202,599 images listed in list_eval_partition.txt are missing"):
        build_shards(sample, tmp_path / "out")
    manifest = build_shards(sample, tmp_path / "out", allow_missing=True, shard_size=500)
    assert [manifest["splits"][s]["samples"] for s in ("train", "valid", "test")] == [1200, 0, 0]
    assert manifest["missing"]["count"] == 202_599 - 1200 and manifest["skipped"] == []
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [500, 500, 200]
    identity = dict(line.replace(".jpg", "").split() for line in (sample / "identity_CelebA.txt").read_text().splitlines())
    first = read_tar(tmp_path / "out" / "celeba64-train-000000.tar")
    key = min(name.split(".")[0] for name in first)
    label = json.loads(first[f"{key}.json"])
    assert label["identity"] == int(identity[key]) and label["attributes"] is None
    png = np.asarray(Image.open(io.BytesIO(first[f"{key}.png"])))
    np.testing.assert_array_equal(png, lab_expected(sample / "img_align_celeba" / f"{key}.jpg"))
