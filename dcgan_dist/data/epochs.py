"""Epoch plans: which samples each rank and loader stream takes, and in which order; arithmetic on counts only.

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
  The order depends on (seed, epoch, rank, world_size, W): resume with the same `data.workers`.
* Shuffling. Shards are reshuffled every epoch; within a stream, samples pass through a seeded
  buffer of `data.shuffle_buffer` samples (WebDataset's shuffle, drawn on sample indices in advance).
  Because the order is known before anything is read, a resumed epoch skips shards no remaining
  batch needs and decodes nothing it skips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from dcgan_dist.seeds import epoch_order_seed


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of n items (images, shards) in one epoch: a function of (seed, epoch) only, the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_order_seed(seed, epoch)))


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


@dataclass(frozen=True)
class Stream:
    """One stream's share of a rank's epoch: positions [lo, lo + len(order)) of the epoch's sample sequence,
    emitted in `order` (offsets from lo), a batch at a time."""

    lo: int
    order: np.ndarray
    batches: int


@dataclass(frozen=True)
class EpochPlan:
    """What fixes every epoch's batches on one rank: the split's shard sizes, the batches, the rank, the seed,
    the number of streams W and the shuffle buffer."""

    shard_samples: tuple[int, ...]
    batches_per_epoch: int  # floor(samples / (world_size x batch_size))
    batch_size: int
    rank: int
    world_size: int
    seed: int
    streams: int
    buffer: int

    def stream(self, epoch: int, w: int) -> Stream:
        """Stream w of this rank in `epoch`: batches w, w + W, ... of the rank, in the order they are emitted."""
        B, W, nb = self.batch_size, self.streams, self.batches_per_epoch
        counts = [nb // W + (v < nb % W) for v in range(W)]
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, W, w])
        order = buffer_shuffle_order(counts[w] * B, self.buffer, rng)
        return Stream((self.rank * nb + sum(counts[:w])) * B, order, counts[w])

    def segments(self, epoch: int, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(shard index, first, last) pieces covering positions [lo, hi) of this epoch's shard order."""
        pos = 0
        for s in epoch_permutation(len(self.shard_samples), self.seed, epoch).tolist():
            a, b = max(lo, pos), min(hi, pos + self.shard_samples[s])
            if a < b:
                yield s, a - pos, b - pos
            pos += self.shard_samples[s]
            if pos >= hi:
                return
