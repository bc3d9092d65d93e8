"""Checkpoints that prove themselves: checksums.json lists every file with its sha256 (checked here with
hashlib directly); real checkpoints damaged the ways disks and people damage them are reported in one line
and passed over for the newest one that verifies; `dcgan-train --verify-checkpoints` says so per
checkpoint; the next save clears what a crash or a damaged checkpoint left."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcgan_dist.checkpoint import (CHECKSUMS, CheckpointError, checkpoint_dirs, resume_or_start, verify_checkpoint,
                                   write_checksums)
from dcgan_dist.config import load_config
from dcgan_dist.parallel import build_accelerator
from dcgan_dist.train import build_gan, main, train

TINY = ["model.ngf=8", "model.ndf=8", "model.nz=16", "model.ema_decay=0",  # G, D and state.pt: the files named below
         "train.batch_size=8", "data.workers=0", "log.every=5",
        "log.images_every=100", "ckpt.every=5", "ckpt.keep=3", "diag.enabled=false"]


def config(run_dir: Path, folder: Path, *extra: str):
    return load_config(None, [*TINY, f"data.source={folder}", f"run.dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image_folder) -> Path:
    """A run with two real checkpoints, step-00000005 and step-00000010."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    train(config(run_dir, image_folder, "train.max_steps=10"))
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-00000005", "step-00000010"]
    return run_dir


@pytest.fixture
def run_dir(tmp_path, trained) -> Path:
    """A copy of the trained run, free to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def flip_bit_inside_a_weight(path: Path, tensor: str) -> None:
    """Flip one bit in the middle of `tensor`'s data, found through the safetensors header."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8:8 + header_len])[tensor]["data_offsets"]
    data[8 + header_len + (start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda ck: (ck / "G.safetensors").write_bytes((ck / "G.safetensors").read_bytes()[:5000]),
    "zero_bytes": lambda ck: (ck / "state.pt").write_bytes(b""),
    "text_instead_of_safetensors": lambda ck: (ck / "D.safetensors").write_text("weights went here\n"),
    "flipped_bit_in_a_weight": lambda ck: flip_bit_inside_a_weight(ck / "G.safetensors", "main.0.weight"),
    "file_missing": lambda ck: (ck / "D.safetensors").unlink(),
    "checksums_garbled": lambda ck: (ck / CHECKSUMS).write_text('{"files": {"G.saf'),
}
EXPECTED = {
    "truncated": "G.safetensors has 5000 bytes, checksums.json says",
    "zero_bytes": "state.pt has 0 bytes, checksums.json says",
    "text_instead_of_safetensors": "D.safetensors has 18 bytes, checksums.json says",
    "flipped_bit_in_a_weight": "G.safetensors: sha256 differs from checksums.json (its bytes changed)",
    "file_missing": "D.safetensors is missing",
    "checksums_garbled": "checksums.json is unreadable (JSONDecodeError:",
}


def test_checksums_list_every_file_of_the_folder_with_its_sha256(trained):
    for ck in checkpoint_dirs(trained):
        listed = json.loads((ck / CHECKSUMS).read_text())["files"]
        on_disk = sorted(p.name for p in ck.iterdir() if p.name != CHECKSUMS)
        assert sorted(listed) == on_disk == ["D.safetensors", "G.safetensors", "state.pt"]
        for name, entry in listed.items():
            data = (ck / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert verify_checkpoint(ck) == ("ok", "3 files match checksums.json")


def test_any_file_a_folder_holds_is_covered_whatever_its_name(trained, tmp_path):
    ck = Path(shutil.copytree(checkpoint_dirs(trained)[-1], tmp_path / "step-00000010"))
    (ck / "G_ema.safetensors").write_bytes(b"an extra tensor file")
    assert verify_checkpoint(ck) == ("damaged", "G_ema.safetensors is not listed in checksums.json")
    write_checksums(ck)
    assert "G_ema.safetensors" in json.loads((ck / CHECKSUMS).read_text())["files"]
    assert verify_checkpoint(ck).status == "ok"
    (ck / "G_ema.safetensors").write_bytes(b"an extra tensor fila")
    assert verify_checkpoint(ck) == ("damaged", "G_ema.safetensors: sha256 differs from checksums.json "
                                                "(its bytes changed)")


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_is_reported_in_one_line_and_passed_over(run_dir, image_folder, capsys, damage):
    latest, previous = run_dir / "checkpoints" / "step-00000010", run_dir / "checkpoints" / "step-00000005"
    DAMAGE[damage](latest)
    verdict = verify_checkpoint(latest)
    assert verdict.status == "damaged" and verdict.detail.startswith(EXPECTED[damage]), verdict
    cfg = config(run_dir, image_folder)
    accelerator = build_accelerator(cfg)
    gan_step = build_gan(cfg, accelerator)
    capsys.readouterr()
    state, resumed_from, _ = resume_or_start(accelerator, run_dir, gan_step, torch.zeros(1), 8, (2e-4, 2e-4))
    assert resumed_from == previous and state.step == 5
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[dcgan-train] checkpoint {latest} is damaged, passed over: {verdict.detail}"]
    weights = load_file(str(previous / "G.safetensors"))
    for k, v in accelerator.unwrap_model(gan_step.G).state_dict().items():
        assert torch.equal(v, weights[k])


def test_a_flipped_bit_loads_without_complaint_so_only_the_checksum_catches_it(run_dir):
    path = run_dir / "checkpoints" / "step-00000010" / "G.safetensors"
    before = {k: v.clone() for k, v in load_file(str(path)).items()}  # not views of the mapped file
    flip_bit_inside_a_weight(path, "main.0.weight")
    after = load_file(str(path))  # the file still parses: nothing but the checksum tells
    changed = {k: int((before[k] != after[k]).sum()) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"main.0.weight": 1}


def test_verify_checkpoints_prints_one_line_each_and_fails_when_one_is_damaged(run_dir, capsys):
    assert main(["--verify-checkpoints", str(run_dir)]) == 0
    ck = run_dir / "checkpoints"
    assert capsys.readouterr().out.splitlines() == [
        f"ok         {ck}/step-00000005: 3 files match checksums.json",
        f"ok         {ck}/step-00000010: 3 files match checksums.json"]
    DAMAGE["flipped_bit_in_a_weight"](ck / "step-00000010")
    (ck / "step-00000012.tmp").mkdir()
    assert main(["--verify-checkpoints", str(run_dir)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"ok         {ck}/step-00000005: 3 files match checksums.json",
        f"damaged    {ck}/step-00000010: G.safetensors: sha256 differs from checksums.json (its bytes changed)",
        f"partial    {ck}/step-00000012.tmp: an interrupted write, never loaded; the next save removes it"]
    assert main(["--verify-checkpoints", str(run_dir / "absent")]) == 2


def test_checkpoint_of_an_earlier_version_without_checksums_is_loaded_with_a_note(run_dir, image_folder, capsys):
    latest = run_dir / "checkpoints" / "step-00000010"
    (latest / CHECKSUMS).unlink()
    assert main(["--verify-checkpoints", str(run_dir)]) == 0
    note = "no checksums.json (written by an earlier version), loaded without a check"
    assert capsys.readouterr().out.splitlines()[-1] == f"unverified {latest}: {note}"
    cfg = config(run_dir, image_folder)
    accelerator = build_accelerator(cfg)
    gan_step = build_gan(cfg, accelerator)
    capsys.readouterr()  # the accelerator's own lines (precision chosen)
    _, resumed_from, _ = resume_or_start(accelerator, run_dir, gan_step, torch.zeros(1), 8, (2e-4, 2e-4))
    assert resumed_from == latest
    assert capsys.readouterr().out.splitlines() == [f"[dcgan-train] note: checkpoint {latest}: {note}"]


def test_run_whose_checkpoints_all_fail_refuses_in_one_line(run_dir, image_folder, capsys):
    for ck in checkpoint_dirs(run_dir):
        DAMAGE["zero_bytes"](ck)
    assert main([*TINY, f"data.source={image_folder}", f"run.dir={run_dir}", "train.max_steps=12"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"dcgan-train: error: {run_dir}/checkpoints: none of its 2 checkpoint(s) verifies (newest: "
                   f"step-00000010); see `dcgan-train --verify-checkpoints {run_dir}`, or start over with run.fresh=true")
    with pytest.raises(CheckpointError):  # the same from the library call
        cfg = config(run_dir, image_folder)
        accelerator = build_accelerator(cfg)
        resume_or_start(accelerator, run_dir, build_gan(cfg, accelerator), torch.zeros(1), 8, (2e-4, 2e-4))


def test_next_save_clears_interrupted_writes_incomplete_and_passed_over_checkpoints(run_dir, image_folder, capsys):
    ck = run_dir / "checkpoints"
    DAMAGE["flipped_bit_in_a_weight"](ck / "step-00000010")
    for partial in ("step-00000011.tmp", ".tmp-step-00000012"):  # this version's and an earlier one's
        (ck / partial).mkdir()
        (ck / partial / "G.safetensors").write_bytes(b"partial")
    (ck / "step-00000007").mkdir()
    (ck / "step-00000007" / "G.safetensors").write_bytes(b"partial")
    best = Path(shutil.copytree(ck / "step-00000005", ck / "best"))  # another name: not the pruning's business
    train(config(run_dir, image_folder, "train.max_steps=8"))
    out = capsys.readouterr().out
    assert f"checkpoint {ck}/step-00000010 is damaged, passed over: G.safetensors: sha256" in out
    assert f"resumed from {ck}/step-00000005" in out
    assert sorted(p.name for p in ck.iterdir()) == ["best", "step-00000005", "step-00000008"]
    assert verify_checkpoint(best).status == "ok"
    assert torch.load(ck / "step-00000008" / "state.pt", weights_only=True)["step"] == 8
