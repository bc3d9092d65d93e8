"""The WebDataset shard loader: equal, reproducible, resumable epochs of uint8 batches.

Shards are WebDataset tars (`{key}.json` + `{key}.{png|jpg|npy}` per sample) listed in
manifest.json by `dcgan-shards`. The path of a batch: `manifest` lists the split's shards,
`epochs` plans which samples this rank's loader streams take in which order, `shard_index`
maps the shards a stream needs and finds their samples, `decode` turns a batch of them into
pixels. This module runs the streams in DataLoader workers that persist across epochs.

Batches are uint8 (N, 3, 64, 64), pinned in the DataLoader when `data.pin_memory` and CUDA are
available; the trainer moves them non-blocking and normalises on the device. The loader is not
passed through `accelerator.prepare`: it already yields this rank's share.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan_dist.config import ConfigError, DataConfig
from dcgan_dist.data import Batch, worker_ignores_sigterm
from dcgan_dist.data.decode import decode_batch
from dcgan_dist.data.epochs import EpochPlan
from dcgan_dist.data.manifest import MANIFEST_NAME, SIZE, ShardFile, read_manifest
from dcgan_dist.data.shard_index import ShardSamples, index_shard


class DamageLog:
    """Damaged samples this process met: counted, with the first of each shard written to stderr."""

    def __init__(self, prefix: str, folder: Path):
        self.prefix, self.folder = prefix, folder
        self.count = 0
        self._shards: set[str] = set()

    def add(self, shard: str, message: str) -> None:
        self.count += 1
        if shard not in self._shards:
            self._shards.add(shard)
            print(f"{self.prefix}{message} ({self.count} damaged samples so far; later ones in this shard are "
                  f"counted, not shown; dcgan-shards verify {self.folder} lists them all)", file=sys.stderr, flush=True)


def read_samples(path: Path, split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Every intact sample of `split` (the first `limit`) in shard order: uint8 (N, 3, 64, 64) and the json dicts.

    Damaged samples are left out and reported on stderr.
    """
    fmt, shards = read_manifest(Path(path), split)
    damage = DamageLog("", Path(path))
    chunks, metas = [], []
    left = float("inf") if limit is None else limit
    for shard in shards:
        if left <= 0:
            break
        samples = index_shard(shard.path, fmt, shard.samples, shard.crc32)
        intact = []
        for i in range(shard.samples):
            if len(intact) >= left:
                break
            problem = samples.damage(i, meta=True)
            if problem is None:
                intact.append(i)
            else:
                damage.add(str(shard.path), f"{problem}: left out")
        chunks.append(decode_batch(fmt, [(samples, i) for i in intact]))
        metas += [samples.meta(i) for i in intact]
        left -= len(intact)
    images = torch.cat(chunks) if chunks else torch.empty((0, 3, SIZE, SIZE), dtype=torch.uint8)
    return images, metas


def replace_damaged(items: list[tuple[ShardSamples, int]], strict: bool) -> tuple[list[tuple[ShardSamples, int]],
                                                                                   list[tuple[str, str]]]:
    """The batch with each damaged sample replaced by the next intact one of the batch (wrapping around),
    and (shard, message) for each replacement. Raises ConfigError under `strict`, or when no sample is intact."""
    problems = [samples.damage(i) for samples, i in items]
    if not any(problems):
        return items, []
    first = next(p for p in problems if p)
    if strict:
        raise ConfigError(f"{first} (data.strict: true stops at a damaged sample; dcgan-shards verify lists them all)")
    intact = [n for n, p in enumerate(problems) if p is None]
    if not intact:
        raise ConfigError(f"{first}; every sample of a batch of {len(items)} is damaged, none can stand in "
                          "(dcgan-shards verify lists them all; rebuild with dcgan-shards build)")
    out, replaced = list(items), []
    for n, problem in enumerate(problems):
        if problem:
            out[n] = items[next((m for m in intact if m > n), intact[0])]
            samples, i = out[n]
            replaced.append((str(items[n][0].path), f"{problem}: replaced by {samples.keys[i]} of its batch"))
    return out, replaced


def _as_is(item: object) -> object:
    """The DataLoader's collate step: items are whole batches already (default_convert would walk the keys)."""
    return item


@dataclass
class _Failure:
    """A worker's ConfigError, passed back as data so the main process raises it as one line."""

    message: str


class _EpochBatches(IterableDataset):
    """One rank's batches of the epoch in `position` = (epoch, start), as DataLoader worker i of a round-robin sees it.

    `position` is a shared-memory tensor the main process sets before each epoch, so persistent workers
    (no fork and setup per epoch: about 0.4 s to the first batch on a 2-core machine) follow along.
    """

    def __init__(self, fmt: str, shards: list[ShardFile], plan: EpochPlan, position: torch.Tensor, strict: bool):
        self.fmt, self.shards, self.plan, self.position, self.strict = fmt, shards, plan, position, strict

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str], list[tuple[str, str]]] | _Failure]:
        epoch, start = self.position.tolist()
        info = get_worker_info()
        first = start + (info.id if info is not None else 0)
        if first >= self.plan.batches_per_epoch:
            return
        try:
            # This worker yields rank batches first, first + W, ...: stream first % W from its batch first // W.
            yield from self._stream(epoch, first % self.plan.streams, first // self.plan.streams)
        except ConfigError as e:
            yield _Failure(str(e))

    def _stream(self, epoch: int, w: int, start: int) -> Iterator[tuple[torch.Tensor, list[str], list[tuple[str, str]]]]:
        """Stream w's batches from its batch `start`, reading only the shards those batches need; with each
        batch, its replaced damaged samples."""
        B, stream = self.plan.batch_size, self.plan.stream(epoch, w)
        order, n = stream.order, len(stream.order)
        wanted = np.zeros(n, bool)
        wanted[order[start * B:]] = True
        held: dict[int, tuple[ShardSamples, int]] = {}  # stream index -> (its shard, index in shard)
        segments = self.plan.segments(epoch, stream.lo, stream.lo + n)
        read_upto = 0  # stream indices < read_upto have been read (or were not wanted)
        for b in range(start, stream.batches):
            emit = order[b * B:(b + 1) * B].tolist()
            while read_upto <= max(emit):
                s, first, last = next(segments)
                if wanted[read_upto:read_upto + last - first].any():
                    shard = self.shards[s]
                    samples = index_shard(shard.path, self.fmt, shard.samples, shard.crc32)
                    for i in range(first, last):
                        if wanted[read_upto + i - first]:
                            held[read_upto + i - first] = (samples, i)
                read_upto += last - first
            items, replaced = replace_damaged([held.pop(i) for i in emit], self.strict)
            yield decode_batch(self.fmt, items), [samples.keys[i] for samples, i in items], replaced


class ShardBatchSource:
    """`BatchSource` over a `dcgan-shards` folder; `dcgan_dist.data.epochs` describes the epoch plan."""

    def __init__(self, path: Path, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int):
        self.path, self.cfg = Path(path), cfg
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.format, self.shards = read_manifest(self.path, cfg.split, strict=cfg.strict)
        self.unchecked = sum(s.crc32 is None for s in self.shards)  # shards built before checksums were recorded
        if cfg.strict and self.unchecked:
            raise ConfigError(f"config key 'data.strict': true needs per-member checksums, and {self.path} has none "
                              f"(built by an older dcgan-shards); rebuild it with dcgan-shards build --out {self.path}")
        self.samples = sum(s.samples for s in self.shards)
        self.batches_per_epoch = self.samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"shard folder {self.path}: split {cfg.split!r} has {self.samples} samples, expected at least "
                f"{world_size * batch_size} (train.batch_size x processes)"
            )
        self.workers = min(cfg.workers, self.batches_per_epoch)  # every worker gets a batch from the start
        self.plan = EpochPlan(tuple(s.samples for s in self.shards), self.batches_per_epoch, batch_size, rank,
                              world_size, seed, streams=max(1, self.workers), buffer=cfg.shuffle_buffer)
        self._position = torch.zeros(2, dtype=torch.int64)  # (epoch, start) of the current batches() call
        if self.workers:
            self._position.share_memory_()
        self._loader = self._new_loader()
        self._generation = 0  # batches() calls so far: an older, unfinished one must not read the newer epoch
        self.damaged = DamageLog(f"[dcgan-train] rank {rank}: " if world_size > 1 else "[dcgan-train] ", self.path)

    def _new_loader(self) -> DataLoader:
        """Persistent workers on `_EpochBatches`; its own generator, since DataLoader draws a worker
        base seed per iterator that would otherwise consume the global torch RNG the trainer's resume
        reproduces."""
        return DataLoader(_EpochBatches(self.format, self.shards, self.plan, self._position, self.cfg.strict),
                          batch_size=None,
                          collate_fn=_as_is, num_workers=self.workers, persistent_workers=self.workers > 0,
                          pin_memory=self.cfg.pin_memory and torch.cuda.is_available(), generator=torch.Generator(),
                          worker_init_fn=worker_ignores_sigterm)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of `epoch` from batch `start`; one epoch at a time (the workers are shared)."""
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start: got {start}, expected 0 to {self.batches_per_epoch}")
        self._generation += 1
        generation = self._generation
        self._position[0], self._position[1] = epoch, start
        iterator = iter(self._loader)  # restarts the persistent workers on the new position
        damaged_before = self.damaged.count
        for index in range(start, self.batches_per_epoch + 1):
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
            images, keys, replaced = item
            for shard, message in replaced:
                self.damaged.add(shard, message)
            if index == self.batches_per_epoch - 1 and self.damaged.count > damaged_before:  # said before the
                # last batch is handed out: a trainer that reaches its last step there does not come back
                print(f"{self.damaged.prefix}epoch {epoch}: {self.damaged.count - damaged_before} damaged samples "
                      f"replaced ({self.damaged.count} so far)", file=sys.stderr, flush=True)
            yield Batch(images, keys)

    def describe(self) -> str:
        """The source in one line, with what the manifest cannot vouch for: shards without checksums, shards of another size."""
        line = (f"{self.format} shards {self.path} (split {self.cfg.split}): {self.samples} samples in "
                f"{len(self.shards)} shards, {self.batches_per_epoch} batches of {self.batch_size} per epoch per "
                f"process ({self.world_size} processes, {self.workers} loader workers each, shuffle buffer "
                f"{self.cfg.shuffle_buffer})")
        if self.unchecked:
            slower = " and png/jpg decode through PIL (slower)" if self.format != "npy" else ""
            line += (f"; note: {self.unchecked} shards have no per-member checksums (built by an older dcgan-shards), "
                     f"so damaged bytes go undetected{slower}; dcgan-shards build --out {self.path} with the same "
                     "--source and options adds them")
        resized = [s.size_note for s in self.shards if s.size_note]
        if resized:
            line += (f"; note: {len(resized)} shards differ in size from {MANIFEST_NAME} ({resized[0]}): "
                     "their damaged or missing samples will be replaced")
        return line
