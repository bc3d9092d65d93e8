"""Damaged shards, built by `dcgan-shards` and then damaged on disk: each member is checked against the manifest's
crc32 before anything decodes it; a damaged sample is replaced by the next intact one of its batch (or is fatal
under data.strict), and training neither crashes in the PNG decoder nor hangs."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_dist.config import ConfigError, DataConfig
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.data.build.verify import verify_shards
from dcgan_dist.data.loader import ShardBatchSource, read_samples
from dcgan_dist.data.manifest import MANIFEST_NAME
from dist_helpers import REPO, launch_env, run_torchrun

BATCH = 8
FORMATS = {"png": "png", "jpg": "jpg", "raw": "npy"}  # --format -> member extension
# tiny training: a damaged sample must be met, and the run must end within seconds either way
TRAIN = ["model.ngf=8", "model.ndf=8", "model.nz=16", f"train.batch_size={BATCH}", "train.epochs=1",
         "data.workers=2", "data.shuffle_buffer=16", "log.every=5", "log.images_every=1000", "ckpt.every=1000",
         "diag.enabled=false"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """One shard folder per format from the same 100 synthetic faces, 16 samples a shard."""
    root = tmp_path_factory.mktemp("integrity")
    release = write_synthetic_celeba(root / "celeba", 100, modes=3, seed=2)
    return {fmt: _build(release, root / fmt, fmt) for fmt in FORMATS}


def _build(release: Path, out: Path, fmt: str) -> Path:
    build_shards(release, out, fmt=fmt, shard_size=16, workers=1)
    return out


def source(folder: Path, *, strict: bool = False, workers: int = 2, rank: int = 0, world: int = 1) -> ShardBatchSource:
    cfg = DataConfig(source=str(folder), workers=workers, shuffle_buffer=16, strict=strict)
    return ShardBatchSource(folder, cfg, batch_size=BATCH, rank=rank, world_size=world, seed=0)


def member(folder: Path, name: str) -> tuple[Path, tarfile.TarInfo]:
    """The train shard holding member `name`, and the member's header, read with tarfile."""
    for shard in sorted(folder.glob("celeba64-train-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name == name:
                    return shard, info
    raise AssertionError(f"{name} is in no train shard")


def flip_byte(folder: Path, name: str) -> Path:
    """Flip one byte in the middle of member `name`'s payload; returns its shard."""
    shard, info = member(folder, name)
    data = bytearray(shard.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    return shard


def truncate_inside(folder: Path, name: str) -> tuple[Path, set[str]]:
    """Cut the shard holding `name` in the middle of that member; returns the shard and the keys it loses."""
    shard, info = member(folder, name)
    with tarfile.open(shard) as tar:
        keys = [m.name.split(".")[0] for m in tar]
    lost = set(keys[keys.index(name.split(".")[0]):])
    shard.write_bytes(shard.read_bytes()[:info.offset_data + info.size // 2])
    return shard, lost


def near_a_shard_end(folder: Path, ext: str) -> str:
    """The image member of the second-to-last sample of the second train shard: cutting there loses two samples."""
    with tarfile.open(folder / "celeba64-train-000001.tar") as tar:
        return [m.name for m in tar if m.name.endswith(f".{ext}")][-2]


def with_the_rule(clean: list, damaged_keys: set[str]) -> list[list[str]]:
    """The keys each batch of a clean epoch becomes when the damaged ones are replaced by the next intact
    key of the same batch, wrapping around (the documented rule)."""
    out = []
    for batch in clean:
        intact = [n for n, k in enumerate(batch.keys) if k not in damaged_keys]
        out.append([k if k not in damaged_keys else batch.keys[next((m for m in intact if m > n), intact[0])]
                    for n, k in enumerate(batch.keys)])
    return out


def damaged_copy(built: dict[str, Path], fmt: str, tmp_path: Path) -> Path:
    return shutil.copytree(built[fmt], tmp_path / fmt)


# ----------------------------------------------------------------------------------------------- the loader

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_flipped_byte_is_replaced_within_its_batch_and_reported_once(built, fmt, tmp_path, capsys):
    clean = list(source(built[fmt]).batches(0))
    key = clean[1].keys[3]
    name = f"{key}.{FORMATS[fmt]}"
    folder = damaged_copy(built, fmt, tmp_path)
    shard = flip_byte(folder, name)
    src = source(folder)
    for epoch in range(2):
        batches = list(src.batches(epoch))
        expected = clean if epoch == 0 else list(source(built[fmt]).batches(epoch))
        assert len(batches) == len(expected) == src.batches_per_epoch
        assert [b.keys for b in batches] == with_the_rule(expected, {key})
        for got, want in zip(batches, expected):  # pixels: the stand-in's, from the undamaged shards
            assert torch.equal(got.images, torch.stack([want.images[want.keys.index(k)] for k in got.keys]))
    lines = capsys.readouterr().err.splitlines()
    reports = [line for line in lines if name in line]
    assert len(reports) == 1 and str(shard) in reports[0] and "crc32" in reports[0]
    assert f"replaced by {clean[1].keys[4]} of its batch" in reports[0]
    assert [line for line in lines if "epoch" in line] == [
        "[dcgan-train] epoch 0: 1 damaged samples replaced (1 so far)",
        "[dcgan-train] epoch 1: 1 damaged samples replaced (2 so far)"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_strict_stops_at_the_damaged_member_naming_shard_and_member(built, fmt, tmp_path):
    key = list(source(built[fmt]).batches(0))[2].keys[0]
    folder = damaged_copy(built, fmt, tmp_path)
    shard = flip_byte(folder, f"{key}.{FORMATS[fmt]}")
    with pytest.raises(ConfigError) as err:
        list(source(folder, strict=True).batches(0))
    message = str(err.value)
    assert "\n" not in message and str(shard) in message and f"{key}.{FORMATS[fmt]} has crc32" in message
    assert "data.strict" in message


def test_a_truncated_shard_loses_its_tail_to_stand_ins(built, tmp_path, capsys):
    clean = list(source(built["png"]).batches(0))
    folder = damaged_copy(built, "png", tmp_path)
    shard, lost = truncate_inside(folder, near_a_shard_end(folder, "png"))
    assert len(lost) == 2
    src = source(folder)
    assert "1 shards differ in size from manifest.json" in src.describe()
    batches = list(src.batches(0))
    assert [b.keys for b in batches] == with_the_rule(clean, lost)
    assert not lost & {k for b in batches for k in b.keys}
    assert all(b.images.shape == (BATCH, 3, 64, 64) for b in batches)
    report = [line for line in capsys.readouterr().err.splitlines() if str(shard) in line]
    assert len(report) == 1 and "missing, the shard ends at byte" in report[0]
    with pytest.raises(ConfigError, match=f"shard {shard}: .* bytes, manifest.json says .*data.strict"):
        source(folder, strict=True)


def test_read_samples_leaves_damaged_samples_out(built, tmp_path, capsys):
    images, metas = read_samples(built["png"])
    keys = [m["id"] for m in metas]
    folder = damaged_copy(built, "png", tmp_path)
    flip_byte(folder, f"{keys[5]}.json")  # labels are checked too
    flip_byte(folder, f"{keys[20]}.png")
    got, got_metas = read_samples(folder)
    assert [m["id"] for m in got_metas] == keys[:5] + keys[6:20] + keys[21:]
    assert torch.equal(got, torch.cat([images[:5], images[6:20], images[21:]]))
    err = capsys.readouterr().err
    assert f"{keys[5]}.json has crc32" in err and f"{keys[20]}.png has crc32" in err and "left out" in err
    assert read_samples(folder, limit=6)[1][5]["id"] == keys[6]


def test_every_batch_full_when_all_but_one_sample_is_damaged(built, tmp_path):
    clean = list(source(built["raw"], workers=0).batches(0))
    folder = damaged_copy(built, "raw", tmp_path)
    for key in clean[0].keys[1:]:
        flip_byte(folder, f"{key}.npy")
    first = next(iter(source(folder, workers=0).batches(0)))
    assert first.keys == [clean[0].keys[0]] * BATCH and torch.equal(first.images, clean[0].images[:1].expand(BATCH, -1, -1, -1))
    flip_byte(folder, f"{clean[0].keys[0]}.npy")
    with pytest.raises(ConfigError, match="every sample of a batch of 8 is damaged"):
        next(iter(source(folder, workers=0).batches(0)))


def test_verify_names_the_damaged_member(built, tmp_path):
    folder = damaged_copy(built, "jpg", tmp_path)
    shard = flip_byte(folder, "000020.jpg")
    problems = verify_shards(folder, workers=1)
    assert f"{shard.name}: 000020.jpg has crc32" in "\n".join(problems)
    assert [p for p in problems if "crc32" in p and "000020.jpg" not in p] == []


# ------------------------------------------------------------------------------- shards without checksums

def without_checksums(folder: Path) -> Path:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            del entry["crc32"]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


LOAD_UNCHECKED = """
import sys
from dcgan_dist.config import DataConfig
from dcgan_dist.data import make_batch_source
source = make_batch_source(DataConfig(source=sys.argv[1], workers=0, shuffle_buffer=16), batch_size=8, rank=0,
                           world_size=1, seed=0)
print(source.describe())
for batch in source.batches(0):
    pass
"""


def test_shards_without_checksums_train_with_a_note_and_never_crash_the_decoder(built, tmp_path):
    """Old shard sets: PNG decodes through PIL, which raises where torchvision's decoder kills the process."""
    folder = without_checksums(damaged_copy(built, "png", tmp_path))
    clean = list(source(built["png"]).batches(0))
    assert [b.keys for b in source(folder).batches(0)] == [b.keys for b in clean]
    assert all(torch.equal(a.images, b.images) for a, b in zip(source(folder).batches(0), clean))  # PIL = torchvision
    flip_byte(folder, f"{clean[1].keys[2]}.png")
    done = subprocess.run([sys.executable, "-c", LOAD_UNCHECKED, str(folder)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 1, done.stderr[-2000:]  # not -11 (SIGSEGV)
    assert "no per-member checksums" in done.stdout and f"dcgan-shards build --out {folder}" in done.stdout
    assert f"{clean[1].keys[2]}.png does not decode" in done.stderr.splitlines()[-1]
    with pytest.raises(ConfigError, match="'data.strict': true needs per-member checksums"):
        source(folder, strict=True)


# ---------------------------------------------------------------------------------------------- training

def train(folder: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcgan_dist.train", f"data.source={folder}", f"run.dir={run_dir}",
                           *TRAIN, *extra], capture_output=True, text=True, timeout=180, cwd=REPO, env=launch_env())


def train_keys(folder: Path) -> list[str]:
    """Keys of the trainer's first epoch (same seed, batch, workers and buffer as TRAIN)."""
    cfg = DataConfig(source=str(folder), workers=2, shuffle_buffer=16)
    return [k for b in ShardBatchSource(folder, cfg, batch_size=BATCH, rank=0, world_size=1, seed=0).batches(0)
            for k in b.keys]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_training_replaces_damaged_samples_and_finishes(built, fmt, tmp_path):
    """A flipped byte in an image member (png: torchvision's decoder would kill the process), and for png also
    a truncated shard."""
    folder = damaged_copy(built, fmt, tmp_path)
    name = f"{train_keys(folder)[11]}.{FORMATS[fmt]}"
    expected = {flip_byte(folder, name): f"{name} has crc32"}
    if fmt == "png":
        truncated = truncate_inside(folder, near_a_shard_end(folder, "png"))[0]
        assert truncated not in expected
        expected[truncated] = "(truncated)"
    done = train(folder, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    for shard, what in expected.items():
        reports = [line for line in done.stderr.splitlines() if str(shard) in line]
        assert len(reports) == 1 and what in reports[0] and "replaced by" in reports[0]
    assert "[dcgan-train] epoch 0: " in done.stderr and "[dcgan-train] done: step 10/10" in done.stdout


def test_training_under_strict_fails_in_one_line_naming_shard_and_member(built, tmp_path):
    folder = damaged_copy(built, "png", tmp_path)
    name = f"{train_keys(folder)[11]}.png"
    shard = flip_byte(folder, name)
    done = train(folder, tmp_path / "run", "data.strict=true")
    assert done.returncode == 2, done.stderr[-3000:]  # a config error, not -11 (SIGSEGV) nor a hang
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dcgan-train: error: shard {shard}: {name} has crc32")


def test_two_ranks_keep_equal_batches_with_damaged_samples(built, tmp_path):
    """Every rank takes the same number of batches, or DDP waits forever for the one that stopped early."""
    folder = damaged_copy(built, "png", tmp_path)
    keys = train_keys(folder)
    flip_byte(folder, f"{keys[3]}.png")
    truncate_inside(folder, near_a_shard_end(folder, "png"))
    done = run_torchrun(2, "-m", "dcgan_dist.train", f"data.source={folder}", f"run.dir={tmp_path / 'run'}", *TRAIN,
                        timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[dcgan-train] done:" in done.stdout and "damaged" in done.stderr


# ----------------------------------------------------------------------------------- what the builder records

def test_manifest_checksums_match_the_members_read_back(built):
    for fmt, ext in FORMATS.items():
        manifest = json.loads((built[fmt] / MANIFEST_NAME).read_text())
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                with tarfile.open(built[fmt] / entry["name"]) as tar:
                    payloads = {m.name: tar.extractfile(m).read() for m in tar}
                keys = sorted({name.split(".")[0] for name in payloads})
                assert entry["crc32"] == {e: [zlib.crc32(payloads[f"{k}.{e}"]) for k in keys] for e in (ext, "json")}
    with tarfile.open(next(built["png"].glob("celeba64-train-*.tar"))) as tar:  # the checksummed bytes are the image
        png = next(m for m in tar if m.name.endswith(".png"))
        assert np.asarray(Image.open(io.BytesIO(tar.extractfile(png).read()))).shape == (64, 64, 3)
