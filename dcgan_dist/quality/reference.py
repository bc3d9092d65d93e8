"""The real split's features and statistics, computed once per (shards, split, count, network) and cached.

Extracting Inception features of a test split takes minutes on a GPU and hours on a CPU, so the
result is kept beside the shards:

    SHARDS/fid-stats/<split>-<count>-<manifest sha256, 16 hex>-<network sha1, 12 hex>.npz

holding the mean and covariance (float64, for FID) and the features (float32, for KID and
precision/recall). The name carries the sha256 of manifest.json, which lists every shard's sha256:
a rebuilt shard set has another manifest, so stale statistics are never reused, and those of earlier
builds are deleted when new ones are written. The file also records the full hashes and is checked
against them when read (np.load with allow_pickle=False). Where the shard folder is not writable,
the cache goes to $XDG_CACHE_HOME/dcgan_dist/fid-stats (default ~/.cache/...), and the log says so.
The first `count` images of the split in shard order are used (all of them when count is None).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dcgan_dist.data.loader import read_samples  # the data package's public reader (only import of it)
from dcgan_dist.data.manifest import MANIFEST_NAME, read_manifest
from dcgan_dist.errors import summary
from dcgan_dist.fileio import atomic_path
from dcgan_dist.quality import QualityError
from dcgan_dist.quality.distances import feature_stats
from dcgan_dist.quality.inception import FeatureExtractor

CACHE_DIR = "fid-stats"
_CACHE_NAME = re.compile(r"^(?P<split>.+)-(?P<count>\d+)-(?P<manifest>[0-9a-f]{16})-(?P<network>[0-9a-f]{12})\.npz$")


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: np.ndarray  # (count, D) float32
    split: str
    count: int
    manifest_sha256: str
    network_sha1: str
    path: Path | None  # the cache file, None when it could not be written
    cached: bool  # read from the cache rather than computed


def fallback_cache_dir() -> Path:
    """Where statistics go when the shard folder is read-only."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dcgan_dist" / CACHE_DIR


def _read_cache(path: Path, expected: dict) -> ReferenceStats | str:
    """The cached statistics, or why the file cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stats = {key: z[key] for key in ("mu", "sigma", "features", "manifest_sha256", "network_sha1", "split",
                                             "count")}
    except (OSError, ValueError, KeyError, EOFError) as e:
        return summary(e)
    found = {key: stats[key].item() for key in expected}
    if found != expected:
        return f"made for {found}, expected {expected}"
    n, d = stats["features"].shape if stats["features"].ndim == 2 else (-1, -1)
    if n != expected["count"] or stats["mu"].shape != (d,) or stats["sigma"].shape != (d, d):
        return (f"arrays of shapes {stats['features'].shape}, {stats['mu'].shape}, {stats['sigma'].shape} "
                f"do not fit {expected['count']} features")
    return ReferenceStats(stats["mu"], stats["sigma"], stats["features"], path=path, cached=True, **expected)


def _write_cache(path: Path, stats: ReferenceStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, mu=stats.mu, sigma=stats.sigma, features=stats.features, split=stats.split, count=stats.count,
                 manifest_sha256=stats.manifest_sha256, network_sha1=stats.network_sha1)


def _remove_stale(folder: Path, manifest_sha256: str, log: Callable[[str], None]) -> None:
    """Statistics of earlier builds of this shard folder: their manifest is gone, nothing can use them."""
    for path in folder.glob("*.npz"):
        match = _CACHE_NAME.match(path.name)
        if match and match["manifest"] != manifest_sha256[:16]:
            path.unlink(missing_ok=True)
            log(f"removed {path}: statistics of an earlier build of the shards")


def reference_stats(shards: Path | str, split: str, count: int | None, extractor: FeatureExtractor, *,
                    log: Callable[[str], None] | None = None, fallback: Path | None = None) -> ReferenceStats:
    """Features, mean and covariance of the first `count` images of `split` (all when None), cached.

    `extractor` needs `sha1` and `features(images, log, what)`; `fallback` overrides fallback_cache_dir().
    """
    log = log or (lambda message: None)
    shards = Path(shards)
    _, files = read_manifest(shards, split)  # one-line ConfigError for a missing or malformed folder or split
    available = sum(f.samples for f in files)
    n = available if count is None else min(count, available)
    if n < 2:
        raise QualityError(f"shard folder {shards}: split {split!r} has {available} images, expected at least 2")
    if count is not None and count > available:
        log(f"split {split!r} of {shards} has {available:,} images, fewer than the {count:,} asked for: using all")
    manifest_sha256 = hashlib.sha256((shards / MANIFEST_NAME).read_bytes()).hexdigest()
    expected = {"split": split, "count": n, "manifest_sha256": manifest_sha256, "network_sha1": extractor.sha1}
    name = f"{split}-{n}-{manifest_sha256[:16]}-{extractor.sha1[:12]}.npz"
    primary, secondary = shards / CACHE_DIR, fallback or fallback_cache_dir()
    for folder in (primary, secondary):
        if (folder / name).is_file():
            found = _read_cache(folder / name, expected)
            if isinstance(found, ReferenceStats):
                log(f"reference statistics: {found.path} ({n:,} {split} images)")
                return found
            log(f"ignoring {folder / name}: {found}")

    images, _ = read_samples(shards, split, n)
    features = extractor.features(images, log, what=f"real {split} images")
    mu, sigma = feature_stats(features)
    stats = ReferenceStats(mu, sigma, features.astype(np.float32), path=None, cached=False, **expected)
    try:
        _write_cache(primary / name, stats)
        stats.path = primary / name
        _remove_stale(primary, manifest_sha256, log)
    except OSError as e:
        log(f"{primary} is not writable ({summary(e)}): caching reference statistics in {secondary}")
        try:
            _write_cache(secondary / name, stats)
            stats.path = secondary / name
        except OSError as e2:
            log(f"reference statistics not cached ({summary(e2)}): they will be computed again next time")
    if stats.path is not None:
        log(f"reference statistics written to {stats.path}")
    return stats
