"""Shard folders in the `dcgan-shards` format, written here with Python's tarfile (not by the loader's code)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, pixels, allow_pickle=False)
    else:
        Image.fromarray(pixels).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt])
    return buf.getvalue()


def label(key: str, split: str) -> dict:
    return {"id": key, "split": split, "attributes": None, "identity": int(key) % 7, "landmarks": None, "bbox": None}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, counts: list[int], fmt: str = "npy", split: str = "train", seed: int = 0,
                 extra: dict[int, dict[str, bytes]] | None = None,
                 tar_format: int = tarfile.USTAR_FORMAT) -> dict[str, np.ndarray]:
    """Shards of `counts` samples (keys 000001, ...) with random pixels; returns key -> (64, 64, 3) uint8.

    `extra` maps a shard index to additional members (name -> bytes), written between the first
    sample's json and its image.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels, entries, next_id = {}, [], 1
    for s, count in enumerate(counts):
        name = f"celeba64-{split}-{s:06d}.tar"
        with tarfile.open(folder / name, "w", format=tar_format) as tar:
            for i in range(count):
                key = f"{next_id:06d}"
                next_id += 1
                pixels[key] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                add_member(tar, f"{key}.json", json.dumps(label(key, split)).encode())
                for member, data in (extra or {}).get(s, {}).items() if i == 0 else ():
                    add_member(tar, member, data)
                add_member(tar, f"{key}.{fmt}", encode_image(pixels[key], fmt))
        data = (folder / name).read_bytes()
        entries.append({"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    total = sum(counts)
    manifest = {"tool": "tests", "format": fmt, "size": 64, "preprocessing": {}, "source": {},
                "splits": {split: {"samples": total, "shards": entries}},
                "totals": {"samples": total, "shards": len(entries)}, "skipped": [], "missing": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return pixels
