"""GAN failure-mode diagnostics: gradient norms, sample diversity, mode coverage, alarms (docs/failure_modes.md).

`Diagnostics`, `RealReference` and `real_reference` load torch on first use, so code that only
reads a run's `diagnostics.json` (dcgan-report) starts without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

DIAGNOSTICS_JSON = "diagnostics.json"  # in the run folder: the real reference, G's early gradient norms, every alarm
_MONITOR_NAMES = ("Diagnostics", "RealReference", "real_reference")

__all__ = ["DIAGNOSTICS_JSON", *_MONITOR_NAMES]

if TYPE_CHECKING:
    from dcgan_dist.diagnostics.monitor import Diagnostics, RealReference, real_reference


def __getattr__(name: str) -> Any:
    if name in _MONITOR_NAMES:
        from dcgan_dist.diagnostics import monitor

        return getattr(monitor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
