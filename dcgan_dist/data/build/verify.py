"""`dcgan-shards verify`: re-read every shard of a folder against its manifest.json."""
from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from dcgan_dist.data.build import ShardError
from dcgan_dist.data.build.celeba import SPLITS
from dcgan_dist.data.build.pack import SHARD_NAME
from dcgan_dist.data.build.workers import default_workers, ordered_map, process_pool
from dcgan_dist.data.manifest import MANIFEST_NAME, load_manifest
from dcgan_dist.fileio import sha256_of

def _check_image(data: bytes, ext: str, size: int) -> str | None:
    """Why an image member is bad, or None."""
    try:
        if ext == "npy":
            array = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            with Image.open(io.BytesIO(data)) as im:
                if im.mode != "RGB":
                    return f"is {im.mode}, expected RGB"
                array = np.asarray(im)
    except Exception as e:  # any decoder failure is a finding, not a crash
        return f"does not decode ({type(e).__name__}: {e})"
    if array.shape != (size, size, 3) or array.dtype != np.uint8:
        return f"is {array.shape} {array.dtype}, expected ({size}, {size}, 3) uint8"
    return None


def _check_shard(task: tuple[Path, str, dict, str, int]) -> list[str]:
    """Every mismatch between one shard file and its manifest entry."""
    path, split, entry, ext, size = task
    name = entry["name"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    if path.stat().st_size != entry["bytes"]:
        problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
    elif sha256_of(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest's")
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, _, member_ext = info.name.partition(".")
                members.setdefault(key, {})[member_ext] = tar.extractfile(info).read() if info.isfile() else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable tar ({type(e).__name__}: {e})")
    crc32 = entry.get("crc32")
    if crc32 is None:
        problems.append(f"{name}: no per-member checksums (built by an older dcgan-shards; a rebuild adds them)")
    elif not (isinstance(crc32, dict) and all(isinstance(crc32.get(m), list) and len(crc32[m]) == entry["samples"]
                                              and all(isinstance(v, int) for v in crc32[m]) for m in (ext, "json"))):
        problems.append(f"{name}: crc32 is not a list of {entry['samples']} integers for each of {ext} and json")
        crc32 = None
    for position, (key, parts) in enumerate(members.items()):
        if sorted(parts) != sorted(["json", ext]):
            problems.append(f"{name}: sample '{key}' has members {sorted(parts)}, expected {sorted(['json', ext])}")
            continue
        for member in (ext, "json") if crc32 is not None and position < entry["samples"] else ():
            found, listed = zlib.crc32(parts[member]), crc32[member][position]
            if found != listed:
                problems.append(f"{name}: {key}.{member} has crc32 {found:08x}, manifest says {listed:08x}")
        bad = _check_image(parts[ext], ext, size)
        if bad:
            problems.append(f"{name}: {key}.{ext} {bad}")
        try:
            label = json.loads(parts["json"])
            if label.get("id") != key or label.get("split") != split:
                raise ValueError(f"id {label.get('id')!r}, split {label.get('split')!r}")
        except (ValueError, AttributeError) as e:
            problems.append(f"{name}: {key}.json is not this sample's label ({e}), expected id {key!r}, split {split!r}")
    if len(members) != entry["samples"]:
        problems.append(f"{name}: {len(members)} samples read, manifest says {entry['samples']}")
    return problems


def verify_shards(out: Path, workers: int | None = None) -> list[str]:
    """Re-read every shard in `out` against manifest.json; returns the mismatches (empty: all good).

    Checks sizes and sha256, that every sample has its json and image, each member's crc32, that every
    image decodes to (size, size, 3) uint8, the per-shard and total counts, and that no stray shards lie beside.
    """
    out = Path(out)
    try:
        manifest = load_manifest(out)
        ext, size, splits = manifest["format"], manifest["size"], manifest["splits"]
        tasks = [(out / e["name"], split, e, ext, size) for split in SPLITS for e in splits[split]["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{out / MANIFEST_NAME}: expected a shard manifest written by dcgan-shards build "
                         f"({type(e).__name__}: {e})") from None
    problems = []
    processes = max(1, min(workers or default_workers(), len(tasks)))
    with process_pool(processes) as pool:
        for found in ordered_map(pool, _check_shard, tasks, 2 * processes):
            problems += found
    for split in SPLITS:
        listed = sum(e["samples"] for e in splits[split]["shards"])
        if listed != splits[split]["samples"]:
            problems.append(f"manifest: {split} says {splits[split]['samples']} samples, its shards list {listed}")
    totals = {"samples": sum(t[2]["samples"] for t in tasks), "bytes": sum(t[2]["bytes"] for t in tasks)}
    for key, value in totals.items():
        if manifest.get("totals", {}).get(key) != value:
            problems.append(f"manifest: totals.{key} is {manifest.get('totals', {}).get(key)}, its shards sum to {value}")
    names = {t[0].name for t in tasks}
    problems += [f"{p.name}: not in the manifest (a stray or temporary file)" for p in sorted(out.iterdir())
                 if (SHARD_NAME.fullmatch(p.name) and p.name not in names) or p.name.endswith(".tar.tmp")]
    return problems
