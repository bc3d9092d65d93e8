"""Files that are either complete or absent: write under a temporary name, then rename.

A crash, a full disk or a kill -9 mid-write leaves the previous file (or none) and at most a
`NAME.tmp` beside it, never a truncated file under the real name. `sha256_of` is how files that
must prove themselves later (checkpoints) are fingerprinted.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any error remove it.

    `durable`: fsync the file and its folder, for files a resumed run depends on (checkpoints, shards).
    The temporary may be a file or a folder.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
        if durable and tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: Path | str, data: str | bytes, *, durable: bool = False) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path, durable=durable) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def sha256_of(path: Path | str) -> str:
    """The file's sha256 as hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
