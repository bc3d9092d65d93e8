"""manifest.json, the contract between the shard builder and everything that reads shards.

`dcgan-shards build` writes it last, so it never describes tars that are not there; the loader,
the trainer's choice of source, `dcgan-shards verify` and the diagnostics read it through here.
It names the image format and size, and per split the shard files with their sample counts,
byte sizes, sha256 and each member's `zlib.crc32` (`crc32`: per member extension, a list in tar
order), which the loader checks before it decodes a byte.
"""
from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from pathlib import Path

from dcgan_dist.config import ConfigError
from dcgan_dist.fileio import atomic_write

MANIFEST_NAME = "manifest.json"  # what makes a folder a shard folder
JOURNAL_NAME = ".dcgan-shards-journal.jsonl"  # a build in progress (or interrupted): its finished shards
IMAGE_FORMATS = ("png", "jpg", "npy")  # image member extensions the loader decodes
SIZE = 64  # the model's image side; shards of another size are refused at read time


@dataclass(frozen=True)
class ShardFile:
    path: Path
    samples: int
    crc32: dict[str, array] | None = None  # member extension -> each sample's zlib.crc32, in tar order
    size_note: str | None = None  # the file's size differs from the manifest's, tolerated: its samples are checked


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


def _checksums(path: Path, where: str, crc32: object, members: tuple[str, str], samples: int) -> dict[str, array]:
    """A shard entry's `crc32`, checked: per member extension, one unsigned 32-bit integer per sample."""
    if not isinstance(crc32, dict) or sorted(crc32) != sorted(members):
        shape = ", ".join(f"{m!r}: [...]" for m in members)
        raise _bad_manifest(path, f"{where}: crc32 {str(crc32)[:60]!r}, expected {{{shape}}}")
    out = {}
    for member in members:
        values = crc32[member]
        try:
            if not isinstance(values, list) or len(values) != samples:
                raise ValueError
            out[member] = array("Q", values)  # raises for anything but integers in [0, 2**64)
            if out[member] and max(out[member]) >= 2 ** 32:
                raise ValueError
        except (ValueError, TypeError, OverflowError):
            raise _bad_manifest(path, f"{where}: crc32.{member}, expected {samples} integers in [0, 2**32), "
                                "one per sample") from None
    return out


def read_manifest(path: Path, split: str, *, strict: bool = False) -> tuple[str, list[ShardFile]]:
    """The image format and the shard files of `split`, each checked to exist.

    A shard whose size differs from the manifest's is refused when its members have no checksums or
    under `strict`; otherwise it is read, and its damaged or missing samples are found one by one.
    """
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
        crc32 = _checksums(path, where, entry["crc32"], (fmt, "json"), samples) if "crc32" in entry else None
        file = path / name
        if not file.is_file():
            raise ConfigError(f"shard {file}: missing (listed in {path / MANIFEST_NAME})")
        expected, found = entry.get("bytes"), file.stat().st_size
        size_note = None
        if isinstance(expected, int) and found != expected:
            size_note = f"shard {file}: {found} bytes, {MANIFEST_NAME} says {expected}"
            if crc32 is None:
                raise ConfigError(f"{size_note} (damaged or replaced)")
            if strict:
                raise ConfigError(f"{size_note} (damaged or replaced; data.strict: true refuses it)")
        shards.append(ShardFile(file, samples, crc32, size_note))
    return fmt, shards
