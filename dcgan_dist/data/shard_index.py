"""Where one shard's samples lie: a tar mapped read-only and grouped into `{key}.json` + `{key}.{format}`.

A struct-based ustar scan finds the members with few Python operations per image (WebDataset's tar
reader is the fallback for pax or GNU members). Only `{key}.json` and `{key}.{manifest format}`
members are looked at; any other member (`.pickle`, `.pyd`, `.pth`, ...) is skipped by offset and
never read into an object. For npy shards the index also finds, for the whole shard at once, the
payloads that are exactly what `np.save` writes for uint8 (64, 64, 3), so a batch's pixels are
gathered with one strided view instead of parsing each array.

`ShardSamples.damage` says whether a sample's bytes can be trusted before anything decodes them:
each member's `zlib.crc32` against the manifest's, and, for a truncated shard, which samples are
missing. Problems with the shard as a whole raise `ConfigError` naming the file.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import struct
import tarfile
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided
from webdataset.tariterators import tar_file_iterator

from dcgan_dist.config import ConfigError
from dcgan_dist.data.manifest import MANIFEST_NAME, SIZE
from dcgan_dist.errors import first_line

PIXELS = SIZE * SIZE * 3


def _npy_header() -> bytes:
    """The bytes `np.save` puts before the pixels of a C-order uint8 (64, 64, 3) array."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((SIZE, SIZE, 3), np.uint8), allow_pickle=False)
    return buf.getvalue()[:-PIXELS]


NPY_HEADER = _npy_header()
_USTAR = struct.Struct("100s24x12s20xc100x6s82x155s")  # name, size, typeflag, magic, prefix


def _ustar_members(data) -> tuple[list[str], list[int], list[int], bool] | None:
    """Names, payload starts and ends of the regular members of a plain ustar archive, and whether it is
    complete (ends in an end-of-archive block); a truncated one gives its whole members. None if it is not ustar."""
    names, starts, ends = [], [], []
    pos, size = 0, len(data)
    unpack = _USTAR.unpack_from
    while pos + 512 <= size:
        name, length, flag, magic, prefix = unpack(data, pos)
        if name[0] == 0:  # end-of-archive block
            return names, starts, ends, True
        if magic[:5] != b"ustar" or flag not in (b"0", b"\0", b"5"):
            return None  # pax or GNU extensions, links, a damaged header: the general reader decides
        try:
            length = int(length.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        pos += 512
        if pos + length > size:
            break
        if flag != b"5":
            name = name.rstrip(b"\0")
            if prefix[0]:
                name = prefix.rstrip(b"\0") + b"/" + name
            names.append(name.decode("utf-8", "surrogateescape"))
            starts.append(pos)
            ends.append(pos + length)
        pos += (length + 511) // 512 * 512
    return names, starts, ends, False


def _tar_members(path: Path, wanted: tuple[str, ...]) -> tuple[bytes, list[str], list[int], list[int]]:
    """WebDataset's tar reader, for archives the ustar scan declines: the wanted payloads laid end to end."""
    names, payloads, starts, ends, pos = [], [], [], [], 0
    try:
        with open(path, "rb") as stream:
            for member in tar_file_iterator(stream, select_files=lambda n: n.partition(".")[2] in wanted):
                names.append(member["fname"])
                payloads.append(member["data"])
                starts.append(pos)
                pos += len(member["data"])
                ends.append(pos)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"shard {path}: not a readable tar ({first_line(e)})") from None
    return b"".join(payloads), names, starts, ends


@dataclass
class ShardSamples:
    """One shard's samples in tar order: keys, and where each one's image and json lie in `data`.

    `data` is the shard mapped read-only (page cache, no copy) or, for a non-ustar shard, the
    wanted payloads; members other than json and the image format are never read from it. A
    truncated shard has fewer keys than `expected`: the samples past its end are missing.
    """

    path: Path
    fmt: str
    data: bytes | mmap.mmap
    keys: list[str]
    image_starts: list[int]
    image_ends: list[int]
    meta_starts: list[int]
    meta_ends: list[int]
    expected: int = 0  # samples the manifest lists (set by index_shard)
    crc32: dict[str, array] | None = None  # the manifest's checksums: member extension -> one per sample
    pixel_rows: np.ndarray | None = None  # npy: row r = the PIXELS bytes after a canonical header at byte 512 r
    rows: list[int] | None = None  # npy: sample i's row in pixel_rows, -1 where the fast path does not apply

    def __post_init__(self) -> None:
        self._view = memoryview(self.data)  # slices without copies, for the checksums

    def damage(self, i: int, *, meta: bool = False) -> str | None:
        """Why sample i's image (and with `meta` its json) cannot be trusted, naming shard and member; None if it can.

        Unchecked, None, when the manifest has no checksums (shards built before they were recorded).
        """
        if i >= len(self.keys):
            return (f"shard {self.path}: sample {i + 1} of {self.expected} is missing, the shard ends at byte "
                    f"{len(self.data)} (truncated)")
        if self.crc32 is None:
            return None
        members = ((self.fmt, self.image_starts, self.image_ends),) + (("json", self.meta_starts, self.meta_ends),) * meta
        for ext, starts, ends in members:
            found, listed = zlib.crc32(self._view[starts[i]:ends[i]]), self.crc32[ext][i]
            if found != listed:
                return f"shard {self.path}: {self.keys[i]}.{ext} has crc32 {found:08x}, {MANIFEST_NAME} says {listed:08x}"
        return None

    def meta(self, i: int) -> dict:
        try:
            return json.loads(self.data[self.meta_starts[i]:self.meta_ends[i]])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"shard {self.path}: {self.keys[i]}.json is not JSON ({e})") from None


def index_shard(path: Path, fmt: str, expected: int | None = None,
                crc32: dict[str, array] | None = None) -> ShardSamples:
    """Group the shard's members into samples (`{key}.json` + `{key}.{fmt}`); ignore any other member.

    `expected`: the manifest's sample count; a shard cut short may hold fewer (see `ShardSamples.damage`),
    a complete one must hold exactly that many. `crc32`: the manifest's checksums, for `damage`.
    """
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    members = _ustar_members(data)
    if members is None:
        data, *members = _tar_members(path, (fmt, "json"))
        members.append(True)
    names, starts, ends, complete = members
    out = ShardSamples(path, fmt, data, [], [], [], [], [], crc32=crc32)
    key, image, meta = None, -1, -1
    for i, name in enumerate(names + [None]):  # None: flushes the last sample
        if name is not None:
            sample, _, ext = name.partition(".")
            if "/" in ext:  # a dot in a folder name: the key runs to the first dot of the file name
                folder, _, base = name.rpartition("/")
                stem, _, ext = base.partition(".")
                sample = f"{folder}/{stem}"
            if ext != fmt and ext != "json":
                continue  # an unexpected member: skipped, never read
            if sample == key:
                if (image if ext == fmt else meta) >= 0:
                    raise ConfigError(f"shard {path}: member {name!r} appears twice in sample {key!r}")
                image, meta = (i, meta) if ext == fmt else (image, i)
                continue
        if key is not None:
            if image < 0 or meta < 0:
                if name is None and not complete:
                    break  # the last sample lost a member to the truncation: it is missing
                raise ConfigError(f"shard {path}: sample {key!r} lacks {key}.{fmt if image < 0 else 'json'}, "
                                  f"expected {key}.json and {key}.{fmt}")
            out.keys.append(key)
            out.image_starts.append(starts[image])
            out.image_ends.append(ends[image])
            out.meta_starts.append(starts[meta])
            out.meta_ends.append(ends[meta])
        if name is not None:
            key, image, meta = sample, (i if ext == fmt else -1), (i if ext == "json" else -1)
    if expected is not None and (len(out.keys) > expected or (complete and len(out.keys) != expected)):
        raise ConfigError(f"shard {path}: {len(out.keys)} samples, {MANIFEST_NAME} says {expected}")
    out.expected = len(out.keys) if expected is None else expected
    if fmt == "npy":
        _map_npy_rows(out)
    return out


def _map_npy_rows(samples: ShardSamples) -> None:
    """Find, for the whole shard at once, the npy payloads that are exactly `np.save` of uint8 (64, 64, 3).

    Tar payloads start on 512-byte blocks, so one strided view over the shard (row r = the PIXELS bytes
    that follow a header at byte 512 r) lets a batch gather all its images with a single indexing op.
    """
    data = np.frombuffer(samples.data, np.uint8)
    starts, ends = np.asarray(samples.image_starts, np.int64), np.asarray(samples.image_ends, np.int64)
    header = len(NPY_HEADER)
    nrows = (len(data) - header - PIXELS) // 512 + 1
    fast = (ends - starts == header + PIXELS) & (starts % 512 == 0)
    rows = np.where(fast, starts // 512, -1)
    if nrows > 0 and fast.any():
        headers = as_strided(data, shape=(nrows, header), strides=(512, 1), writeable=False)
        fast[fast] = (headers[rows[fast]] == np.frombuffer(NPY_HEADER, np.uint8)).all(axis=1)
        samples.pixel_rows = as_strided(data[header:], shape=(nrows, PIXELS), strides=(512, 1), writeable=False)
    samples.rows = np.where(fast, rows, -1).tolist()
