"""The WebDataset shard loader: equal, reproducible, resumable epochs of uint8 batches.

Shards are WebDataset tars (`{key}.json` + `{key}.{png|jpg|npy}` per sample) listed in
manifest.json by `dcgan-shards`. Design, and why:

* Exact equality across ranks. WebDataset's `split_by_node` / `split_by_worker` hand out whole
  shards, so ranks get different sample counts whenever shards are uneven, and DDP hangs on the
  rank with an extra batch. Instead each epoch is planned globally from the manifest counts: the
  shard order is shuffled with (seed, epoch), the split's samples are laid end to end, and rank r
  takes the contiguous range [r P, (r + 1) P) with P = batches_per_epoch x batch_size and
  batches_per_epoch = floor(samples / (world_size x batch_size)); ranges may begin and end inside a
  shard. The few samples left over differ from epoch to epoch.
* Worker splitting in whole batches. A rank's range is cut into W = max(1, min(data.workers,
  batches_per_epoch)) contiguous streams; batch j of the rank comes from stream j % W. The DataLoader
  collects from its workers round-robin, so that order is exactly what it yields. Fewer shards than
  ranks x workers is fine (streams share shards), and every worker has batches, so none sits idle.
  Workers persist across epochs. The order depends on (seed, epoch, rank, world_size, W): resume
  with the same `data.workers`.
* Shuffling. Shards are reshuffled every epoch; within a stream, samples pass through a seeded
  buffer of `data.shuffle_buffer` samples (WebDataset's shuffle, drawn on sample indices in advance).
  Because the order is known before anything is read, `batches(epoch, start)` skips shards no
  remaining batch needs and decodes nothing it skips.
* Few Python operations per image. A stream maps each shard read-only (page cache, no copy), finds
  members with a struct-based ustar scan (WebDataset's tar reader is the fallback for pax or GNU
  members) and decodes a batch at once: npy payloads sit on 512-byte tar blocks, so one strided view
  per shard gathers a batch's pixels and transposes them to NCHW in one numpy call; png/jpg go through
  torchvision's decoder, one call per image. Samples waiting in the shuffle buffer are (shard, index)
  pairs, so buffering costs no copies.
* Safety. Only `{key}.json` and `{key}.{manifest format}` members are looked at; any other member
  (`.pickle`, `.pyd`, `.pth`, ...) is skipped by offset and never read into an object. npy payloads
  are checked against the header `np.save` writes for uint8 (64, 64, 3), otherwise loaded with
  `np.load(allow_pickle=False)`; nothing is unpickled. Problems raise `ConfigError` naming the file.
* Batches are uint8 (N, 3, 64, 64), pinned in the DataLoader when `data.pin_memory` and CUDA are
  available; the trainer moves them non-blocking and normalises on the device. The loader is not
  passed through `accelerator.prepare`: it already yields this rank's share.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import struct
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from webdataset.tariterators import tar_file_iterator

from dcgan_dist.config import ConfigError, DataConfig
from dcgan_dist.data import MANIFEST_NAME, Batch, worker_ignores_sigterm
from dcgan_dist.data.images import epoch_permutation

IMAGE_FORMATS = ("png", "jpg", "npy")
SIZE = 64
PIXELS = SIZE * SIZE * 3

# torchvision 0.29 deprecates its decoders in favour of torchcodec; they stay because they decode png/jpg
# 1.4-2.3x faster than PIL here, and the warning would otherwise be raised once per decoded image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _npy_header() -> bytes:
    """The bytes `np.save` puts before the pixels of a C-order uint8 (64, 64, 3) array."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((SIZE, SIZE, 3), np.uint8), allow_pickle=False)
    return buf.getvalue()[:-PIXELS]


NPY_HEADER = _npy_header()
_USTAR = struct.Struct("100s24x12s20xc100x6s82x155s")  # name, size, typeflag, magic, prefix


@dataclass(frozen=True)
class ShardFile:
    path: Path
    samples: int


def _bad_manifest(path: Path, what: str) -> ConfigError:
    return ConfigError(f"shard folder {path}: {MANIFEST_NAME} {what}")


def read_manifest(path: Path, split: str) -> tuple[str, list[ShardFile]]:
    """The image format and the shard files of `split`, each checked to exist with the listed size."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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


# ------------------------------------------------------------------------------------------ one shard

def _ustar_members(data) -> tuple[list[str], list[int], list[int]] | None:
    """Names, payload starts and ends of the regular members of a plain ustar archive; None if it is not one."""
    names, starts, ends = [], [], []
    pos, size = 0, len(data)
    unpack = _USTAR.unpack_from
    while pos + 512 <= size:
        name, length, flag, magic, prefix = unpack(data, pos)
        if name[0] == 0:  # end-of-archive block
            break
        if magic[:5] != b"ustar" or flag not in (b"0", b"\0", b"5"):
            return None  # pax or GNU extensions, links, a damaged header: the general reader decides
        try:
            length = int(length.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        pos += 512
        if pos + length > size:
            return None
        if flag != b"5":
            name = name.rstrip(b"\0")
            if prefix[0]:
                name = prefix.rstrip(b"\0") + b"/" + name
            names.append(name.decode("utf-8", "surrogateescape"))
            starts.append(pos)
            ends.append(pos + length)
        pos += (length + 511) // 512 * 512
    return names, starts, ends


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
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"shard {path}: not a readable tar ({first})") from None
    return b"".join(payloads), names, starts, ends


@dataclass
class ShardSamples:
    """One shard's samples in tar order: keys, and where each one's image and json lie in `data`.

    `data` is the shard mapped read-only (page cache, no copy) or, for a non-ustar shard, the
    wanted payloads; members other than json and the image format are never read from it.
    """

    path: Path
    data: bytes | mmap.mmap
    keys: list[str]
    image_starts: list[int]
    image_ends: list[int]
    meta_starts: list[int]
    meta_ends: list[int]
    pixel_rows: np.ndarray | None = None  # npy: row r = the PIXELS bytes after a canonical header at byte 512 r
    rows: list[int] | None = None  # npy: sample i's row in pixel_rows, -1 where the fast path does not apply

    def meta(self, i: int) -> dict:
        try:
            return json.loads(self.data[self.meta_starts[i]:self.meta_ends[i]])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"shard {self.path}: {self.keys[i]}.json is not JSON ({e})") from None


def index_shard(path: Path, fmt: str, expected: int | None = None) -> ShardSamples:
    """Group the shard's members into samples (`{key}.json` + `{key}.{fmt}`); ignore any other member."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    members = _ustar_members(data)
    if members is None:
        data, *members = _tar_members(path, (fmt, "json"))
    names, starts, ends = members
    out = ShardSamples(path, data, [], [], [], [], [])
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
                raise ConfigError(f"shard {path}: sample {key!r} lacks {key}.{fmt if image < 0 else 'json'}, "
                                  f"expected {key}.json and {key}.{fmt}")
            out.keys.append(key)
            out.image_starts.append(starts[image])
            out.image_ends.append(ends[image])
            out.meta_starts.append(starts[meta])
            out.meta_ends.append(ends[meta])
        if name is not None:
            key, image, meta = sample, (i if ext == fmt else -1), (i if ext == "json" else -1)
    if expected is not None and len(out.keys) != expected:
        raise ConfigError(f"shard {path}: {len(out.keys)} samples, {MANIFEST_NAME} says {expected}")
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


def _load_npy(samples: ShardSamples, i: int) -> np.ndarray:
    """Sample i's npy payload through `np.load(allow_pickle=False)`: for headers `np.save` did not write as expected."""
    where = f"shard {samples.path}: {samples.keys[i]}.npy"
    try:
        array = np.load(io.BytesIO(samples.data[samples.image_starts[i]:samples.image_ends[i]]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where} is not a plain npy array ({first})") from None
    if array.dtype != np.uint8 or array.shape != (SIZE, SIZE, 3):
        raise ConfigError(f"{where} is {array.dtype} {array.shape}, expected uint8 ({SIZE}, {SIZE}, 3)")
    return array


def decode_batch(fmt: str, items: list[tuple[ShardSamples, int]]) -> torch.Tensor:
    """uint8 (N, 3, 64, 64), contiguous, for samples given as (shard, index in shard).

    npy: one gather and HWC -> CHW copy per shard in the batch (numpy, single-threaded: torch's uint8
    permute().contiguous() is no faster on one thread and 10x slower with two). png/jpg: one
    torchvision decode per image, 1.4x (png) and 2.3x (jpg) PIL's speed on 64x64 faces here; torchvision
    0.29 deprecates it in favour of torchcodec, so a future torchvision needs this call replaced.
    """
    images = torch.empty((len(items), 3, SIZE, SIZE), dtype=torch.uint8)
    if fmt == "npy":
        chw = images.numpy().reshape(len(items), 3, SIZE * SIZE)
        groups: dict[int, tuple[ShardSamples, list[int], list[int]]] = {}
        for n, (samples, i) in enumerate(items):
            row = samples.rows[i]
            if row < 0:
                chw[n] = _load_npy(samples, i).reshape(SIZE * SIZE, 3).T
                continue
            group = groups.setdefault(id(samples), (samples, [], []))
            group[1].append(n)
            group[2].append(row)
        for samples, positions, rows in groups.values():
            chw[positions] = samples.pixel_rows[rows].reshape(len(rows), SIZE * SIZE, 3).transpose(0, 2, 1)
        return images
    for n, (samples, i) in enumerate(items):
        payload = bytearray(samples.data[samples.image_starts[i]:samples.image_ends[i]])  # writable for frombuffer
        where = f"shard {samples.path}: {samples.keys[i]}.{fmt}"
        try:
            image = decode_image(torch.frombuffer(payload, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{where} does not decode ({first})") from None
        if image.shape != images.shape[1:]:
            raise ConfigError(f"{where} is {tuple(image.shape)} (C, H, W), expected (3, {SIZE}, {SIZE})")
        images[n] = image
    return images


def read_samples(path: Path, split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Every sample of `split` (the first `limit`) in shard order: uint8 (N, 3, 64, 64) and the json dicts."""
    fmt, shards = read_manifest(Path(path), split)
    chunks, metas = [], []
    left = float("inf") if limit is None else limit
    for shard in shards:
        if left <= 0:
            break
        samples = index_shard(shard.path, fmt, shard.samples)
        n = int(min(left, len(samples.keys)))
        chunks.append(decode_batch(fmt, [(samples, i) for i in range(n)]))
        metas += [samples.meta(i) for i in range(n)]
        left -= n
    images = torch.cat(chunks) if chunks else torch.empty((0, 3, SIZE, SIZE), dtype=torch.uint8)
    return images, metas


# ------------------------------------------------------------------------------------------ epochs

def buffer_shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order a `buffer`-sample shuffle buffer emits a stream of n samples in (stream indices).

    Output t is drawn uniformly from the buffer, which then holds stream items below buffer + t:
    WebDataset's `shuffle(buffer)` (less its smaller initial fill), computed on indices before any
    payload is read, so a resumed epoch knows what it may skip.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    if buffer >= n:
        return rng.permutation(n)
    slots = list(range(buffer))
    out = []
    for t, j in enumerate(rng.integers(0, buffer, n - buffer).tolist()):
        out.append(slots[j])
        slots[j] = buffer + t
    out.extend(rng.permutation(slots).tolist())
    return np.asarray(out)


def _as_is(item: object) -> object:
    """The DataLoader's collate step: items are whole batches already (default_convert would walk the keys)."""
    return item


@dataclass
class _Failure:
    """A worker's ConfigError, passed back as data so the main process raises it as one line."""

    message: str


class _EpochBatches(IterableDataset):
    """One rank's batches of the epoch in `plan` = (epoch, start), as DataLoader worker i of a round-robin sees it.

    `plan` is a shared-memory tensor the main process sets before each epoch, so persistent workers
    (no fork and setup per epoch: about 0.4 s to the first batch on a 2-core machine) follow along.
    """

    def __init__(self, source: "ShardBatchSource", plan: torch.Tensor):
        self.fmt, self.shards, self.batch_size = source.format, source.shards, source.batch_size
        self.streams, self.buffer, self.batches_per_epoch = source.streams, source.cfg.shuffle_buffer, source.batches_per_epoch
        self.seed, self.rank, self.world_size, self.plan = source.seed, source.rank, source.world_size, plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]] | _Failure]:
        epoch, start = self.plan.tolist()
        info = get_worker_info()
        first = start + (info.id if info is not None else 0)
        if first >= self.batches_per_epoch:
            return
        try:
            # This worker yields rank batches first, first + W, ...: stream first % W from its batch first // W.
            yield from self._stream(epoch, first % self.streams, first // self.streams)
        except ConfigError as e:
            yield _Failure(str(e))

    def _stream(self, epoch: int, w: int, start: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        B, W, nb = self.batch_size, self.streams, self.batches_per_epoch
        counts = [nb // W + (v < nb % W) for v in range(W)]
        lo = (self.rank * nb + sum(counts[:w])) * B
        n = counts[w] * B
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, W, w])
        order = buffer_shuffle_order(n, self.buffer, rng)
        wanted = np.zeros(n, bool)
        wanted[order[start * B:]] = True
        held: dict[int, tuple[ShardSamples, int]] = {}  # stream index -> (its shard, index in shard)
        segments = iter(self._segments(epoch, lo, lo + n))
        read_upto = 0  # stream indices < read_upto have been read (or were not wanted)
        for b in range(start, counts[w]):
            emit = order[b * B:(b + 1) * B].tolist()
            while read_upto <= max(emit):
                shard, first, last = next(segments)
                if wanted[read_upto:read_upto + last - first].any():
                    samples = index_shard(shard.path, self.fmt, shard.samples)
                    for s in range(first, last):
                        if wanted[read_upto + s - first]:
                            held[read_upto + s - first] = (samples, s)
                read_upto += last - first
            items = [held.pop(i) for i in emit]
            yield decode_batch(self.fmt, items), [samples.keys[s] for samples, s in items]

    def _segments(self, epoch: int, lo: int, hi: int) -> Iterator[tuple[ShardFile, int, int]]:
        """(shard, first, last) pieces covering positions [lo, hi) of this epoch's shard order."""
        pos = 0
        for s in epoch_permutation(len(self.shards), self.seed, epoch).tolist():
            shard = self.shards[s]
            a, b = max(lo, pos), min(hi, pos + shard.samples)
            if a < b:
                yield shard, a - pos, b - pos
            pos += shard.samples
            if pos >= hi:
                return


class ShardBatchSource:
    """`BatchSource` over a `dcgan-shards` folder; see the module docstring for the epoch plan."""

    def __init__(self, path: Path, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int):
        self.path, self.cfg = Path(path), cfg
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.format, self.shards = read_manifest(self.path, cfg.split)
        self.samples = sum(s.samples for s in self.shards)
        self.batches_per_epoch = self.samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"shard folder {self.path}: split {cfg.split!r} has {self.samples} samples, expected at least "
                f"{world_size * batch_size} (train.batch_size x processes)"
            )
        self.workers = min(cfg.workers, self.batches_per_epoch)  # every worker gets a batch from the start
        self.streams = max(1, self.workers)  # W: the rank's range is cut into this many streams
        self._plan = torch.zeros(2, dtype=torch.int64)  # (epoch, start) of the current batches() call
        if self.workers:
            self._plan.share_memory_()
        self._loader = self._new_loader()
        self._generation = 0  # batches() calls so far: an older, unfinished one must not read the newer epoch

    def _new_loader(self) -> DataLoader:
        """Persistent workers on `_EpochBatches`; its own generator, since DataLoader draws a worker
        base seed per iterator that would otherwise consume the global torch RNG the trainer's resume
        reproduces."""
        return DataLoader(_EpochBatches(self, self._plan), batch_size=None, collate_fn=_as_is,
                          num_workers=self.workers, persistent_workers=self.workers > 0,
                          pin_memory=self.cfg.pin_memory and torch.cuda.is_available(), generator=torch.Generator(),
                          worker_init_fn=worker_ignores_sigterm)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of `epoch` from batch `start`; one epoch at a time (the workers are shared)."""
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start: got {start}, expected 0 to {self.batches_per_epoch}")
        self._generation += 1
        generation = self._generation
        self._plan[0], self._plan[1] = epoch, start
        iterator = iter(self._loader)  # restarts the persistent workers on the new plan
        while True:
            if generation != self._generation:
                raise RuntimeError("ShardBatchSource.batches: a later batches() call has taken over the loader; "
                                   "iterate one epoch at a time")
            try:
                item = next(iterator, None)
                if isinstance(item, _Failure):
                    raise ConfigError(item.message)
            except Exception:
                # Stop the workers now. Left to a traceback in a reference cycle, the garbage collector
                # would close the DataLoader's queues before its shutdown, and each worker's join would
                # time out (5 s).
                del iterator
                self._loader = self._new_loader()
                raise
            if item is None:
                return
            yield Batch(*item)

    def describe(self) -> str:
        return (f"{self.format} shards {self.path} (split {self.cfg.split}): {self.samples} samples in "
                f"{len(self.shards)} shards, {self.batches_per_epoch} batches of {self.batch_size} per epoch per "
                f"process ({self.world_size} processes, {self.workers} loader workers each, shuffle buffer "
                f"{self.cfg.shuffle_buffer})")
