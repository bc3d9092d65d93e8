"""Loader workers outlive a scheduler's SIGTERM to every process of the job (the trainer checkpoints first),
and never keep a crashed process from exiting."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset

from dcgan_dist.config import DataConfig
from dcgan_dist.data import worker_ignores_sigterm
from dcgan_dist.data.images import ImageFolderSource
from dcgan_dist.data.loader import ShardBatchSource
from shard_fixtures import write_shards

REPO = Path(__file__).resolve().parents[1]


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


CRASH_WITH_LIVE_WORKERS = """
import sys
from dcgan_dist.config import DataConfig
from dcgan_dist.data import make_batch_source

def train():
    source = make_batch_source(DataConfig(source=sys.argv[1], workers=2), batch_size=8, rank=0, world_size=1, seed=0)
    for batch in source.batches(0):
        raise RuntimeError("a step failed")  # uncaught: its traceback keeps the loader and its workers alive

train()
"""


def test_an_uncaught_error_exits_promptly_with_workers_alive(tmp_path):
    """multiprocessing's exit handler waits for daemonic children after a SIGTERM, which the workers ignore."""
    write_shards(tmp_path, [40])
    done = subprocess.run([sys.executable, "-c", CRASH_WITH_LIVE_WORKERS, str(tmp_path)], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert done.returncode == 1 and done.stderr.strip().endswith("RuntimeError: a step failed")
