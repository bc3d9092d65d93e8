"""Process pools for the builders: safe to open from a threaded process, and prompt to stop."""
from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from typing import Callable, Iterator


def default_workers() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_pool(processes: int, initializer: Callable | None = None, initargs: tuple = ()):
    """A worker pool that is safe to open from a process that already runs threads.

    The trainer (torch, accelerate, tensorboard threads) builds the synthetic shards itself;
    workers forked from such a process can deadlock on a lock copied mid-use, so they are
    started by a clean fork server instead, which imports the builders once so that each
    pool's workers start in milliseconds.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dcgan_dist.data.build.pack", "dcgan_dist.data.build.synth",
                                    "dcgan_dist.data.build.verify"])
    return context.Pool(processes, initializer, initargs)


def ordered_map(pool, fn: Callable, tasks: list, window: int) -> Iterator:
    """`pool.imap(fn, tasks)` with at most `window` tasks in flight.

    `imap` queues every task at once; when the consumer stops early (an error, Ctrl-C) the pool's
    task thread can be left blocked on a full pipe and `Pool.terminate` then waits on it forever.
    Feeding tasks as results come back keeps that pipe nearly empty, so stopping is prompt.
    """
    pending: deque = deque()
    remaining = iter(tasks)
    for task in itertools.islice(remaining, window):
        pending.append(pool.apply_async(fn, (task,)))
    while pending:
        result = pending.popleft().get()
        for task in itertools.islice(remaining, 1):
            pending.append(pool.apply_async(fn, (task,)))
        yield result
