"""GAN failure-mode diagnostics: gradient norms, sample diversity, mode coverage, alarms (docs/failure_modes.md)."""
from dcgan_dist.diagnostics.monitor import DIAGNOSTICS_JSON, Diagnostics, RealReference, real_reference

__all__ = ["DIAGNOSTICS_JSON", "Diagnostics", "RealReference", "real_reference"]
