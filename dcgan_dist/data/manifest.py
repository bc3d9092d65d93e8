"""manifest.json, the contract between the shard builder and everything that reads shards.

`dcgan-shards build` writes it last, so it never describes tars that are not there; the loader,
the trainer's choice of source, `dcgan-shards verify` and the diagnostics read it through here.
It names the image format and size, and per split the shard files with their sample counts,
byte sizes and sha256.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dcgan_dist.config import ConfigError
from dcgan_dist.fileio import atomic_write

MANIFEST_NAME = "manifest.json"  # what makes a folder a shard folder
IMAGE_FORMATS = ("png", "jpg", "npy")  # image member extensions the loader decodes
SIZE = 64  # the model's image side; shards of another size are refused at read time


@dataclass(frozen=True)
class ShardFile:
    path: Path
    samples: int


def is_shard_folder(folder: Path | str) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def load_manifest(folder: Path | str) -> dict:
    """The manifest as written, unchecked; raises OSError or ValueError when it is missing or not JSON."""
    return json.loads((Path(folder) / MANIFEST_NAME).read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(Path(folder) / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def synthetic_modes(folder: Path | str) -> int | None:
    """How many modes the synthetic faces the shards were built from have; None for other data."""
    modes = (load_manifest(folder).get("source") or {}).get("synthetic", {}).get("modes")
    return int(modes) if modes else None


def _bad_manifest(path: Path, what: str) -> ConfigError:
    return ConfigError(f"shard folder {path}: {MANIFEST_NAME} {what}")


def read_manifest(path: Path, split: str) -> tuple[str, list[ShardFile]]:
    """The image format and the shard files of `split`, each checked to exist with the listed size."""
    path = Path(path)
    try:
        manifest = load_manifest(path)
    except (OSError, ValueError) as e:
        raise _bad_manifest(path, f"is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict):
        raise _bad_manifest(path, f"holds a {type(manifest).__name__}, expected an object")
    fmt, size, splits = manifest.get("format"), manifest.get("size"), manifest.get("splits")
    if fmt not in IMAGE_FORMATS:
        raise _bad_manifest(path, f"key 'format': got {fmt!r}, expected one of {', '.join(IMAGE_FORMATS)}")
    if size != SIZE:
        raise _bad_manifest(path, f"key 'size': got {size!r}, expected {SIZE} (the model's image size)")
    if not isinstance(splits, dict) or not isinstance(splits.get(split), dict):
        names = ", ".join(splits) if isinstance(splits, dict) else "none"
        raise _bad_manifest(path, f"has no split {split!r} (config key 'data.split'), it has: {names}")
    entries = splits[split].get("shards")
    if not isinstance(entries, list):
        raise _bad_manifest(path, f"key 'splits.{split}.shards': expected a list")
    shards = []
    for i, entry in enumerate(entries):
        where = f"key 'splits.{split}.shards[{i}]'"
        name, samples = (entry.get("name"), entry.get("samples")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise _bad_manifest(path, f"{where}: name {name!r}, expected a file name in the folder")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise _bad_manifest(path, f"{where}: samples {samples!r}, expected an integer >= 0")
        file = path / name
        if not file.is_file():
            raise ConfigError(f"shard {file}: missing (listed in {path / MANIFEST_NAME})")
        expected = entry.get("bytes")
        if isinstance(expected, int) and file.stat().st_size != expected:
            raise ConfigError(f"shard {file}: {file.stat().st_size} bytes, {MANIFEST_NAME} says {expected} (damaged or replaced)")
        shards.append(ShardFile(file, samples))
    return fmt, shards
