"""The trainer's view of data: equal-length epochs of uint8 image batches.

Every source (a folder of images, WebDataset shards) implements `BatchSource`. Batches are
uint8 (N, 3, 64, 64) on the CPU; the trainer moves them to the device non-blocking and
normalises them there, so workers never spend time on float conversion.

The data's path, by when it runs:

* build time, `build/` (the `dcgan-shards` CLI): `celeba` finds CelebA and parses its lists,
  `synth` draws synthetic faces in CelebA's layout, `pack` resizes (`images.lab_resize`) and
  encodes them into tar shards and writes `manifest.json`, `verify` re-reads the shards.
* `manifest`: manifest.json, the one contract between the two sides.
* read time: `prepare` resolves `data.source: synthetic` to built shards; `loader` runs the
  epochs: `epochs` plans them, `shard_index` finds samples in a tar, `decode` makes pixels.
  `images` reads a plain folder of images instead.
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # registers multiprocessing's exit handler before `_kill_loader_workers`, so it runs after
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

from dcgan_dist.config import ConfigError, DataConfig
from dcgan_dist.data.manifest import JOURNAL_NAME, MANIFEST_NAME, is_shard_folder

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (N, C, H, W), CPU, pinned when the source pins
    keys: list[str]  # sample ids, so tests can check which rank saw what


def worker_ignores_sigterm(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a scheduler that sends SIGTERM to every process of a job would kill
    the workers mid-batch; they leave with their parent instead, after it has checkpointed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register
def _kill_loader_workers() -> None:
    """Kill this process's daemonic children (loader workers) as it exits.

    multiprocessing's own exit handler, which runs next, stops them with SIGTERM and then waits for
    them; workers that ignore SIGTERM would make that wait endless whenever one outlives its loader,
    e.g. when the traceback of an uncaught exception still holds the loader.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these deaths as a loader failure
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


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
    if path.is_dir() and not is_shard_folder(path) and ((path / JOURNAL_NAME).exists() or any(path.glob("*.tar"))):
        raise ConfigError(f"config key 'data.source': {path} holds shards but no {MANIFEST_NAME}: an interrupted "
                          "build? run dcgan-shards build again (it keeps the complete shards)")
    if is_shard_folder(path):
        from dcgan_dist.data.loader import ShardBatchSource

        return ShardBatchSource(path, cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    if path.is_dir():
        from dcgan_dist.data.images import ImageFolderSource

        return ImageFolderSource(path, cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    raise ConfigError(
        f"config key 'data.source': got {cfg.source!r}, expected a shard folder with manifest.json "
        "or a folder of images"
    )
