"""One trainer per run folder: an advisory lock on `RUN/train.lock`, held by the main process for the run's life.

A second trainer started on the same `run.dir` would double the TensorBoard curves and overwrite the
first one's checkpoints. The lock is a POSIX record lock (`fcntl.lockf`) on the file: the kernel (or,
on a network file system, its lock manager) releases it when the holder exits in any way, kill -9
included, so a lock left by a dead trainer is simply taken over. The file itself keeps the last
holder's host, pid and start time, for the refusal message.

Where it works: a local disk, NFSv4 and NFSv3 with lockd, Lustre mounted with `-o flock`, GPFS and
BeeGFS - any file system on which POSIX locks are seen by every node. Lustre's `-o localflock` only
locks within one node. After a node crash, NFS keeps the dead holder's lock until its lease runs
out (90 s by default), so a requeued job that starts sooner is refused and can simply be started again.

Record locks are not inherited across fork, so loader worker processes never hold it. They belong to
the process, and closing ANY descriptor of the file drops them: nothing in the holding process opens
the lock file besides `RunLock` itself.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "train.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """`with RunLock(run_dir):` - refuses with `RunLockedError` (one line naming the holder) when taken."""

    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise RunLockedError(f"run.dir {self.path.parent}: in use by {self.holder()}; stop that trainer "
                                     "or choose another run.dir") from None
            raise RunLockedError(f"run.dir {self.path.parent}: cannot lock {self.path} ({os.strerror(exc.errno)}); "
                                 "the file system must support POSIX locks (see docs/reliability.md)") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock; the holder record stays as history
            self._fd = None

    def holder(self) -> str:
        """'pid P on host H since T' from the lock file, as far as it can be read."""
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on host {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (its record in the lock file is unreadable)"

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
