"""The trainer's view of data: equal-length epochs of uint8 image batches.

Every source (a folder of images, WebDataset shards) implements `BatchSource`. Batches are
uint8 (N, 3, 64, 64) on the CPU; the trainer moves them to the device non-blocking and
normalises them there, so workers never spend time on float conversion.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from dcgan_dist.config import ConfigError, DataConfig


MANIFEST_NAME = "manifest.json"  # what makes a folder a shard folder (written by dcgan-shards build)


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (N, C, H, W), CPU, pinned when the source pins
    keys: list[str]  # sample ids, so tests can check which rank saw what


def worker_ignores_sigterm(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a scheduler that sends SIGTERM to every process of a job would kill
    the workers mid-batch; they leave with their parent instead, after it has checkpointed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchSource(Protocol):
    """Equal work on every rank: `batches_per_epoch` is the same for all of them."""

    batches_per_epoch: int
    samples: int  # samples in the whole dataset (all ranks)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of `epoch`, from batch index `start` (to resume mid-epoch).

        The order is a function of (seed, epoch) only, so a resumed run sees exactly the
        batches an uninterrupted one would.
        """
        ...

    def describe(self) -> str:
        """One line for the log: what is read, how many samples, batches per epoch."""
        ...


def make_batch_source(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int) -> BatchSource:
    """Pick the source for `data.source`: a shard folder (has manifest.json) or a folder of images."""
    path = Path(cfg.source)
    if (path / MANIFEST_NAME).is_file():
        from dcgan_dist.data.loader import ShardBatchSource

        return ShardBatchSource(path, cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    if path.is_dir():
        from dcgan_dist.data.images import ImageFolderSource

        return ImageFolderSource(path, cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    raise ConfigError(
        f"config key 'data.source': got {cfg.source!r}, expected a shard folder with manifest.json "
        "or a folder of images"
    )
