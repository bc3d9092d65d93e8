"""Every random stream's seed, derived from `run.seed` in one place so that no two streams collide.

The constants are primes; changing any of them changes every run's numbers (and breaks bitwise resume
of runs started before the change).
"""
from __future__ import annotations

_RUN_STRIDE = 1_000_003  # > any epoch count or rank count: (seed, k) pairs never share a seed
_RANK_STRIDE = 7919


def noise_seed(run_seed: int, rank: int) -> int:
    """The generator that draws z on `rank` (separate from the loader workers' global RNG)."""
    return run_seed * _RUN_STRIDE + _RANK_STRIDE * rank + 1


def reseeded_noise_seed(step: int, rank: int) -> int:
    """z's generator after a resume on another world size: deterministic in (step, rank)."""
    return step * _RANK_STRIDE + rank


def epoch_order_seed(run_seed: int, epoch: int) -> int:
    """The sample order of one epoch, the same on every rank."""
    return run_seed * _RUN_STRIDE + epoch
