"""An exponential moving average (EMA) of the generator's weights, updated in place on the device.

Averaging G's weights over the last steps smooths out the oscillation of adversarial training and
usually gives better samples than the last weights (Yazici et al. 2019, "The unusual effectiveness
of averaging in GAN training"; StyleGAN2-ADA samples and reports its `G_ema`).

The decay per step follows StyleGAN2-ADA's `ema_kimg`/`ema_rampup`, counted in steps instead of
images: `decay` (model.ema_decay) fixes the average's half-life, H = ln 0.5 / ln decay steps
(0.999: 693 steps), and `rampup` (model.ema_rampup) caps it at `rampup` x the updates done so far:

    half_life_t = min(H, t x rampup)          (t: updates before this one; rampup 0: H)
    beta_t = 0.5 ** (1 / max(half_life_t, 1e-8))
    ema = beta_t x ema + (1 - beta_t) x G      (parameters; BatchNorm buffers are copied)

so the first update copies G (beta_0 = 0) and the random initial weights never linger in the
average. Without a ramp, beta_t = decay at every step.

Nothing here reads a value back to the host: t is a device counter, beta_t is computed on the
device, and the average is updated with in-place foreach kernels into tensors that never change,
so a CUDA graph of the training step (fastpath.py) captures the update with the rest of the step.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

MIN_HALF_LIFE = 1e-8  # StyleGAN2-ADA's guard: a half-life of 0 means beta 0, a copy


def half_life_steps(decay: float) -> float:
    """The half-life, in steps, of an average that keeps `decay` of itself per step (0 for decay 0)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay: got {decay}, expected a value in [0, 1)")
    return math.log(0.5) / math.log(decay) if decay > 0 else 0.0


def ema_beta(updates_before: int, decay: float, rampup: float) -> float:
    """beta of the update after `updates_before` earlier ones, in plain Python (for tests and docs)."""
    half_life = half_life_steps(decay)
    if rampup > 0:
        half_life = min(half_life, updates_before * rampup)
    return 0.5 ** (1 / max(half_life, MIN_HALF_LIFE))


class GeneratorEMA:
    """A copy of G (`model`) whose parameters follow G's as a moving average; its buffers follow G's own.

    `updates` (a float64 device scalar) counts the updates done; it is saved with the checkpoint so a
    resumed run continues the ramp exactly.
    """

    def __init__(self, G: nn.Module, decay: float, rampup: float):
        self.decay, self.rampup = decay, rampup
        self.half_life = half_life_steps(decay)
        self.model = copy.deepcopy(G).requires_grad_(False)  # keeps G's device, dtype and memory layout
        self.updates = torch.zeros((), dtype=torch.float64, device=next(G.parameters()).device)
        self._pairs = self._matched(self.model.parameters, G.parameters)
        self._buffer_pairs = self._matched(self.model.buffers, G.buffers)

    @staticmethod
    def _matched(ema_tensors, tensors) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ours, theirs = list(ema_tensors()), list(tensors())
        if len(ours) != len(theirs):
            raise ValueError(f"EMA: {len(ours)} tensors against G's {len(theirs)}")
        return ours, theirs

    def beta(self) -> torch.Tensor:
        """beta of the next update, a float64 device scalar (no host sync)."""
        half_life = torch.full_like(self.updates, self.half_life)
        if self.rampup > 0:
            half_life = torch.minimum(half_life, self.updates * self.rampup)
        return torch.pow(0.5, 1.0 / half_life.clamp(min=MIN_HALF_LIFE))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average toward G's current weights, and G's buffers copied; all in place."""
        weight = (1.0 - self.beta()).float()  # lerp's weight toward G: 1 - beta
        ema_params, params = self._pairs
        torch._foreach_lerp_(ema_params, params, weight)
        ema_buffers, buffers = self._buffer_pairs
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, buffers)
        self.updates.add_(1)

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from G's current weights (a checkpoint without an average); the ramp restarts too."""
        for ours, theirs in (self._pairs, self._buffer_pairs):
            torch._foreach_copy_(ours, theirs)
        self.updates.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors (not copies), by name: the model's parameters and buffers, and the update count."""
        tensors = {f"G_ema.{name}": t for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        tensors["ema/updates"] = self.updates
        return tensors
