"""Loader workers outlive a scheduler's SIGTERM to every process of the job (the trainer checkpoints first)."""
from __future__ import annotations

import os
import signal
import time

from torch.utils.data import DataLoader, IterableDataset

from dcgan_dist.config import DataConfig
from dcgan_dist.data import worker_ignores_sigterm
from dcgan_dist.data.images import ImageFolderSource
from dcgan_dist.data.loader import ShardBatchSource
from shard_fixtures import write_shards


class _SlowPids(IterableDataset):
    def __iter__(self):
        for _ in range(5):
            time.sleep(0.2)
            yield os.getpid()


def test_worker_ignores_sigterm_from_outside():
    items = iter(DataLoader(_SlowPids(), batch_size=None, num_workers=1, worker_init_fn=worker_ignores_sigterm))
    worker = int(next(items))
    os.kill(worker, signal.SIGTERM)
    assert len(list(items)) == 4  # without the init function the DataLoader raises "worker ... killed"


def test_sources_install_it(image_folder, tmp_path, monkeypatch):
    seen = []
    original = DataLoader.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("worker_init_fn"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(DataLoader, "__init__", spy)
    cfg = DataConfig(workers=1)
    folder = ImageFolderSource(image_folder, cfg, batch_size=8, rank=0, world_size=1, seed=0)
    next(iter(folder.batches(0)))
    write_shards(tmp_path, [40])
    shards = ShardBatchSource(tmp_path, cfg, batch_size=8, rank=0, world_size=1, seed=0)
    next(iter(shards.batches(0)))
    assert seen == [worker_ignores_sigterm, worker_ignores_sigterm]
