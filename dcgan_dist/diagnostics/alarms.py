"""The two failure alarms: a condition per check, a patience, and a record of every firing.

An alarm fires when its condition has held for `patience` consecutive checks, stays quiet while
the condition keeps holding, and re-arms once a check finds the condition cleared, so a run
that recovers and fails again is reported twice.
"""
from __future__ import annotations

from dataclasses import dataclass

VANISHING_GRADIENTS = "vanishing_gradients"
MODE_COLLAPSE = "mode_collapse"


@dataclass
class Alarm:
    patience: int
    streak: int = 0  # consecutive checks with the condition up to now
    active: bool = False  # fired, and the condition has not cleared since

    def update(self, condition: bool) -> bool:
        """Feed one check's condition; True exactly when the alarm fires."""
        self.streak = self.streak + 1 if condition else 0
        if not condition:
            self.active = False
            return False
        if self.streak >= self.patience and not self.active:
            self.active = True
            return True
        return False


def vanishing_condition(g_norm: float, g_early: float, d_fake: float, *, ratio: float, floor: float,
                        d_fake_max: float) -> bool:
    """G's gradient norm is below `ratio` x its early value (or below `floor`) while D wins (D(G(z)) < d_fake_max)."""
    return (g_norm < ratio * g_early or g_norm < floor) and d_fake < d_fake_max


def collapse_condition(diversity_ratio: float, coverage: float | None, d_fake: float, *, min_diversity_ratio: float,
                       min_coverage: float, min_d_fake: float) -> bool:
    """Generated diversity below `min_diversity_ratio` x real diversity, or mode coverage below `min_coverage`,
    while D still accepts the samples (D(G(z)) >= `min_d_fake`).

    Alike samples that D rejects outright are a generator that has not learned yet, or one whose
    gradient vanished: not the collapse of a generator that fools D with a few modes.
    """
    low = diversity_ratio < min_diversity_ratio or (coverage is not None and coverage < min_coverage)
    return low and d_fake >= min_d_fake
