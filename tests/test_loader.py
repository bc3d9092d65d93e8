"""The shard loader against shards written here with tarfile (and by `dcgan-shards`): rank and worker
splits, reproducible and resumable epochs, exact pixels, never unpickling, one-line errors."""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dcgan_dist.config import ConfigError, DataConfig
from dcgan_dist.data import loader, make_batch_source, shard_index
from dcgan_dist.data.epochs import buffer_shuffle_order
from dcgan_dist.data.loader import ShardBatchSource, read_samples
from dcgan_dist.data.shard_index import index_shard
from shard_fixtures import label, write_shards

REPO = Path(__file__).resolve().parents[1]
UNEVEN = [7, 300, 13]


def chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)


def source(path: Path, *, workers: int = 0, batch: int = 12, rank: int = 0, world: int = 1, seed: int = 0,
           buffer: int = 50) -> ShardBatchSource:
    cfg = DataConfig(source=str(path), workers=workers, shuffle_buffer=buffer)
    return ShardBatchSource(path, cfg, batch_size=batch, rank=rank, world_size=world, seed=seed)


def epoch_keys(src: ShardBatchSource, epoch: int, start: int = 0) -> list[list[str]]:
    return [b.keys for b in src.batches(epoch, start)]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("uneven")
    return folder, write_shards(folder, UNEVEN, "npy")


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_two_ranks_get_disjoint_samples_and_equal_full_batches(uneven, workers):
    folder, pixels = uneven
    batch, world = 12, 2
    expected_batches = sum(UNEVEN) // (world * batch)  # 13: 312 of the 320 samples are used
    seen = []
    for rank in range(world):
        src = source(folder, workers=workers, batch=batch, rank=rank, world=world)
        assert src.batches_per_epoch == expected_batches and src.samples == sum(UNEVEN)
        batches = list(src.batches(epoch=1))
        assert len(batches) == expected_batches
        for b in batches:
            assert b.images.dtype == torch.uint8 and b.images.shape == (batch, 3, 64, 64)
            assert b.images.is_contiguous()
            assert torch.equal(b.images, torch.stack([chw(pixels[k]) for k in b.keys]))
        seen.append([k for b in batches for k in b.keys])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0] + seen[1])) == world * expected_batches * batch


def test_too_few_shards_for_ranks_times_workers(tmp_path):
    write_shards(tmp_path, [100], "npy")
    keys = []
    for rank in range(2):
        src = source(tmp_path, workers=3, batch=8, rank=rank, world=2)
        batches = epoch_keys(src, 0)
        assert len(batches) == 100 // 16 and all(len(b) == 8 for b in batches)
        keys.append({k for b in batches for k in b})
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 96


def test_epoch_order_is_reproducible_and_changes_with_epoch_and_seed(uneven):
    folder, _ = uneven
    first = epoch_keys(source(folder, seed=5), 2)
    assert epoch_keys(source(folder, seed=5), 2) == first
    assert epoch_keys(source(folder, seed=5), 3) != first
    assert epoch_keys(source(folder, seed=6), 2) != first
    assert sorted(sum(first, [])) != sum(first, [])  # shuffled, not in shard order


@pytest.mark.parametrize("workers", [0, 2])
def test_start_yields_exactly_the_tail_of_the_epoch(uneven, workers):
    folder, _ = uneven
    src = source(folder, workers=workers, batch=12, rank=1, world=2)
    full = epoch_keys(src, 4)
    for start in (1, 2, 3, len(full) - 1, len(full)):
        assert epoch_keys(src, 4, start) == full[start:]


def test_start_skips_without_reading_or_decoding(tmp_path, monkeypatch):
    write_shards(tmp_path, [20] * 16, "npy")
    src = source(tmp_path, batch=10, buffer=0)
    calls = {"index": 0, "decode": 0}
    real_index, real_decode = loader.index_shard, loader.decode_batch

    def counting_index(*args, **kwargs):
        calls["index"] += 1
        return real_index(*args, **kwargs)

    def counting_decode(*args, **kwargs):
        calls["decode"] += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(loader, "index_shard", counting_index)
    monkeypatch.setattr(loader, "decode_batch", counting_decode)
    tail = epoch_keys(src, 0, start=src.batches_per_epoch - 3)
    assert len(tail) == 3 and calls == {"index": 2, "decode": 3}  # 30 samples: the last 1.5 shards


def test_buffer_shuffle_order_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    order = buffer_shuffle_order(1000, 64, rng)
    assert sorted(order.tolist()) == list(range(1000))
    assert all(order[t] < 64 + t for t in range(1000))  # output t comes from the first 64 + t inputs
    assert (order != np.arange(1000)).mean() > 0.9
    assert buffer_shuffle_order(10, 0, rng).tolist() == list(range(10))


@pytest.mark.parametrize("fmt", ["png", "npy", "jpg"])
def test_decoded_pixels_and_metadata(tmp_path, fmt):
    pixels = write_shards(tmp_path, [9, 14], fmt)
    tolerance = 0
    if fmt == "jpg":  # lossy: the reference is PIL's decode of the stored bytes; libjpeg builds may round apart
        tolerance, pixels = 2, {}
        for shard in sorted(tmp_path.glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar:
                    if m.name.endswith(".jpg"):
                        pixels[m.name[:-4]] = np.array(Image.open(tar.extractfile(m)).convert("RGB"))

    def matches(images: torch.Tensor, keys: list[str]) -> bool:
        reference = torch.stack([chw(pixels[k]) for k in keys])
        return images.shape == reference.shape and (images.int() - reference.int()).abs().max() <= tolerance

    images, metas = read_samples(tmp_path)
    assert [m["id"] for m in metas] == sorted(pixels)
    assert metas == [label(m["id"], "train") for m in metas]
    assert matches(images, [m["id"] for m in metas])
    assert all(matches(b.images, b.keys) for b in source(tmp_path, batch=8).batches(0))
    assert torch.equal(read_samples(tmp_path, limit=11)[0], images[:11])


class _Trap:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_unexpected_members_are_never_decoded(tmp_path):
    marker = tmp_path / "unpickled"
    trap = pickle.dumps(_Trap(marker))
    extra = {"000001.pickle": trap, "000001.pyd": b"MZ\x90\x00", "payload.pth": trap, "000001.npy.pickle": trap}
    pixels = write_shards(tmp_path / "shards", [10, 10], "npy", extra={0: extra, 1: extra})
    images, metas = read_samples(tmp_path / "shards")
    assert torch.equal(images, torch.stack([chw(pixels[m["id"]]) for m in metas]))
    keys = [k for b in source(tmp_path / "shards", workers=2, batch=5).batches(0) for k in b.keys]
    assert sorted(keys) == sorted(pixels) and not marker.exists()


def test_object_npy_is_refused_not_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    buf = io.BytesIO()
    np.save(buf, np.array([_Trap(marker)], dtype=object), allow_pickle=True)
    folder = tmp_path / "shards"
    write_shards(folder, [6], "npy")
    bad = folder / "celeba64-train-000000.tar"
    with tarfile.open(bad, "a") as tar:  # a second sample whose npy is an object array
        info = tarfile.TarInfo("999999.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        info = tarfile.TarInfo("999999.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0].update(samples=7, bytes=bad.stat().st_size)
    manifest["splits"]["train"]["samples"] = 7
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for read in (lambda: read_samples(folder),
                 lambda: list(source(folder, workers=2, batch=7).batches(0))):
        with pytest.raises(ConfigError) as err:
            read()
        message = str(err.value)
        assert "\n" not in message and str(bad) in message and "999999.npy" in message
    assert not marker.exists()


def _drop_shard(folder: Path) -> str:
    (folder / "celeba64-train-000001.tar").unlink()
    return "celeba64-train-000001.tar"


def _edit_manifest(**changes):
    def edit(folder: Path) -> str:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest.update(changes)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return "manifest.json"
    return edit


def _truncate_shard(folder: Path) -> str:
    path = folder / "celeba64-train-000000.tar"
    path.write_bytes(path.read_bytes()[:5000])
    return "celeba64-train-000000.tar"


def _garble_manifest(folder: Path) -> str:
    (folder / "manifest.json").write_text("{not json")
    return "manifest.json"


@pytest.mark.parametrize("damage", [_drop_shard, _truncate_shard, _garble_manifest, _edit_manifest(size=32),
                                    _edit_manifest(format="pickle"), _edit_manifest(splits={"valid": {}})],
                         ids=["missing-shard", "truncated-shard", "bad-json", "size-32", "format", "no-train"])
def test_bad_shard_folders_give_one_line_errors(tmp_path, damage):
    write_shards(tmp_path, [8, 8], "npy")
    named = damage(tmp_path)
    with pytest.raises(ConfigError) as err:
        source(tmp_path, batch=4)
    assert "\n" not in str(err.value) and named in str(err.value)


def test_batch_larger_than_the_data_is_a_config_error(tmp_path):
    write_shards(tmp_path, [8, 8], "npy")
    with pytest.raises(ConfigError, match="16 samples, expected at least 18"):
        source(tmp_path, batch=9, world=2)


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reading_matches_webdataset(tmp_path, tar_format, monkeypatch):
    """Against WebDataset's own reader; the pax archive (global header first) takes the fallback path."""
    write_shards(tmp_path, [12], "png", tar_format=tar_format)
    if tar_format == tarfile.PAX_FORMAT:  # rewrite with a pax global header, which ustar parsers must not guess at
        path = tmp_path / "celeba64-train-000000.tar"
        with tarfile.open(path) as old:
            members = [(m, old.extractfile(m).read()) for m in old]
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "made elsewhere"}) as new:
            for m, data in members:
                new.addfile(m, io.BytesIO(data))
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        manifest["splits"]["train"]["shards"][0]["bytes"] = path.stat().st_size
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        assert shard_index._ustar_members(path.read_bytes()) is None
    shard = tmp_path / "celeba64-train-000000.tar"
    ours = index_shard(shard, "png")
    theirs = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert ours.keys == [s["__key__"] for s in theirs]
    assert [ours.data[a:b] for a, b in zip(ours.image_starts, ours.image_ends)] == [s["png"] for s in theirs]
    assert [ours.meta(i) for i in range(12)] == [json.loads(s["json"]) for s in theirs]


def test_builder_shards_through_make_batch_source(tmp_path):
    """Shards from `dcgan-shards` (synthetic CelebA): the trainer's data.source accepts the folder."""
    from dcgan_dist.data.build.pack import build_shards
    from dcgan_dist.data.build.synth import write_synthetic_celeba

    raw = write_synthetic_celeba(tmp_path / "celeba", 60, modes=3, seed=1)
    build_shards(raw, tmp_path / "shards", fmt="npy", shard_size=16, workers=1)
    cfg = DataConfig(source=str(tmp_path / "shards"), workers=0)
    src = make_batch_source(cfg, batch_size=8, rank=0, world_size=1, seed=0)
    assert isinstance(src, ShardBatchSource) and "npy shards" in src.describe()
    images, metas = read_samples(tmp_path / "shards")
    with tarfile.open(tmp_path / "shards" / "celeba64-train-000000.tar") as tar:
        first = np.load(io.BytesIO(tar.extractfile(f"{metas[0]['id']}.npy").read()), allow_pickle=False)
    assert torch.equal(images[0], chw(first)) and len(metas) == src.samples
    assert sum(len(b.keys) for b in src.batches(0)) == src.batches_per_epoch * 8


def test_benchmark_small_mode_writes_its_table(tmp_path):
    out = tmp_path / "table.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_throughput.py"), "--small", "--json", str(out)],
                   check=True, cwd=tmp_path, timeout=600, capture_output=True)  # a hang guard, not a timing
    table = json.loads(out.read_text())
    loads = [row for row in table["rows"] if row["stage"] == "load"]
    assert {row["format"] for row in loads} == {"png", "jpg", "npy"}
    assert {row["workers"] for row in loads} >= {0, 2}
    assert all(row["img_per_s"] > 0 for row in table["rows"])


def test_an_abandoned_epoch_does_not_disturb_the_next(uneven):
    """The trainer takes one batch for its real-image grid, then runs epochs on the same (persistent) workers."""
    folder, _ = uneven
    src = source(folder, workers=2, batch=12, rank=1, world=2)
    grid = src.batches(0)
    next(grid)
    assert epoch_keys(src, 1) == epoch_keys(source(folder, workers=2, batch=12, rank=1, world=2), 1)
    with pytest.raises(RuntimeError, match="one epoch at a time"):
        next(grid)
