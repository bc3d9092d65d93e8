"""One GAN training step in the lab's order, with statistics kept on the device.

1. D on a real batch (target `real_label`) and on G(z).detach() (target 0); one D update.
2. G through the *updated* D with those same fakes (target 1); one G update.

The G step runs D's bare module with D's parameters frozen, so D's weight gradients are
neither computed nor all-reduced. Nothing here reads a value back to the host: the
statistics accumulate in a device tensor that the trainer reads every `log.every` steps.

Skipping a bad step needs no host sync either: the fused Adam optimizers skip an update when
their device `found_inf` flag is set (fp16: the grad scaler sets it; otherwise this module sets
it from the gradients after DDP's all-reduce, so every rank skips the same steps). A loss that
is not finite is turned into NaN gradients, so one rank's bad loss skips the step everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from dcgan_dist.config import LossConfig

# Order of the per-step statistics accumulated on the device (also their TensorBoard tags).
STAT_TAGS = (
    "loss/D",
    "loss/G",
    "D(x)",
    "D(G(z))/before_D_step",
    "D(G(z))/after_D_step",
    "D/positive_logits_real",
    "D/positive_logits_fake",
)
# Counts since the last `take_health` (device): optimizer steps (D and G counted apart) the fp16
# loss scaler skipped, and steps where a loss or, without the scaler, a gradient was not finite.
HEALTH_TAGS = ("amp/skipped_steps", "train/nonfinite_steps")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float = 1.0) -> torch.Tensor:
    """BCE(D(x), real_label) + BCE(D(G(z)), 0), from logits in fp32."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """`non_saturating`: -log D(G(z)). `minimax`: log(1 - D(G(z))), the original, saturating objective."""
    fake_logits = fake_logits.float()
    if kind == "non_saturating":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if kind == "minimax":
        return -F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    raise ValueError(f"loss.generator: unknown kind {kind!r}")


def nan_gradients_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` itself when finite; otherwise NaN, so that every gradient computed from it is NaN.

    BCE-with-logits can be infinite while its gradients stay finite; this makes the optimizer's
    non-finite check (and DDP's all-reduce, on every rank) see the bad step.
    """
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))


def layer_grad_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of the gradient of each layer with parameters, on the device, plus 'total'."""
    norms: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            norms[name.replace("module.", "").replace("main.", "")] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if norms:
        norms["total"] = torch.linalg.vector_norm(torch.stack(list(norms.values())))
    return norms


@dataclass
class StepOutput:
    """What a step hands to diagnostics when asked (device tensors)."""

    real_logits: torch.Tensor
    fake_logits: torch.Tensor
    grad_norms_d: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norms_g: dict[str, torch.Tensor] = field(default_factory=dict)


class GANStep:
    """The training step and its device-side running sums of `STAT_TAGS`."""

    def __init__(self, accelerator: Accelerator, G: nn.Module, D: nn.Module,
                 opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, loss: LossConfig, nz: int, seed: int):
        self.accelerator, self.G, self.D, self.opt_g, self.opt_d = accelerator, G, D, opt_g, opt_d
        self.loss, self.nz = loss, nz
        # z has its own generator: data-loader workers draw from the global RNG, and a resumed
        # run must draw exactly the noise an uninterrupted one would.
        self.noise = torch.Generator(device=accelerator.device)
        self.noise.manual_seed(seed * 1_000_003 + 7919 * accelerator.process_index + 1)
        self.D_bare = accelerator.unwrap_model(D)  # keeps accelerate's autocast wrapper, drops DDP
        for opt in (opt_g, opt_d):
            if not getattr(getattr(opt, "optimizer", opt), "_step_supports_amp_scaling", False):
                raise ValueError("GANStep needs optimizers that skip a step from a device flag, e.g. "
                                 "torch.optim.Adam(..., fused=True)")
        device = accelerator.device
        self.sums = torch.zeros(len(STAT_TAGS), device=device)
        self.finite_steps = torch.zeros((), device=device)  # steps in `sums` (non-finite ones are left out)
        self.health = torch.zeros(len(HEALTH_TAGS), device=device)
        self.streak = torch.zeros((), device=device)  # consecutive non-finite steps up to now
        self.worst_streak = torch.zeros((), device=device)
        self._one = torch.ones((), device=device)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) on the host -> float in [-1, 1] on the device (the lab's scaling)."""
        x = images.to(self.accelerator.device, non_blocking=True)
        return x.float().div_(127.5).sub_(1.0)

    def __call__(self, images: torch.Tensor, collect_grad_norms: bool = False) -> StepOutput:
        acc = self.accelerator
        real = self.normalise(images)
        z = torch.randn(real.shape[0], self.nz, 1, 1, device=acc.device, generator=self.noise)
        fake = self.G(z)

        # D step: real then fake, one update.
        real_logits = self.D(real)
        fake_logits = self.D(fake.detach())
        loss_d = discriminator_loss(real_logits, fake_logits, self.loss.real_label)
        acc.backward(nan_gradients_if_nonfinite(loss_d))
        out = StepOutput(real_logits.detach(), fake_logits.detach())
        if collect_grad_norms:
            acc.unscale_gradients(self.opt_d)
            out.grad_norms_d = layer_grad_norms(self.D)
        skipped_d = self._optimizer_step(self.opt_d)
        self.opt_d.zero_grad(set_to_none=True)

        # G step through the updated D, same fakes; D's weights get no gradient.
        self.D_bare.requires_grad_(False)
        after_logits = self.D_bare(fake)
        self.D_bare.requires_grad_(True)
        loss_g = generator_loss(after_logits, self.loss.generator)
        acc.backward(nan_gradients_if_nonfinite(loss_g))
        if collect_grad_norms:
            acc.unscale_gradients(self.opt_g)
            out.grad_norms_g = layer_grad_norms(self.G)
        skipped_g = self._optimizer_step(self.opt_g)
        self.opt_g.zero_grad(set_to_none=True)

        with torch.no_grad():
            finite = torch.isfinite(loss_d) & torch.isfinite(loss_g)
            if acc.scaler is not None:  # overflow skips are the scaler's routine; only bad losses count
                amp_skipped, nonfinite = skipped_d + skipped_g, (~finite).float()
            else:  # the skip flags already include bad losses, on every rank alike
                amp_skipped, nonfinite = torch.zeros_like(skipped_d), torch.maximum(skipped_d, skipped_g)
            self.health += torch.stack([amp_skipped, nonfinite])
            # Every running tensor is updated in place: a CUDA graph of this step (fastpath.py) replays
            # into the tensors it captured, so none of them may be replaced by a new one.
            self.streak.add_(1).mul_(nonfinite)
            torch.maximum(self.worst_streak, self.streak, out=self.worst_streak)
            self.finite_steps += finite.float()
            self.sums += torch.where(finite, torch.stack([
                loss_d.detach(), loss_g.detach(),
                torch.sigmoid(real_logits.float()).mean(),
                torch.sigmoid(out.fake_logits.float()).mean(),
                torch.sigmoid(after_logits.detach().float()).mean(),
                (real_logits > 0).float().mean(),
                (out.fake_logits > 0).float().mean(),
            ]), 0.0)
        return out

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> torch.Tensor:
        """Step `opt` unless its gradients are not finite; returns 1.0 if skipped, else 0.0 (device)."""
        scaler = self.accelerator.scaler
        if scaler is not None:  # fp16: the scaler checks, skips through found_inf, and lowers its scale
            before = scaler._get_scale_async().clone()
            opt.step()  # accelerate's optimizer wrapper also runs scaler.update()
            return (scaler._get_scale_async() < before).float()
        inner = getattr(opt, "optimizer", opt)
        grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
        found_inf = torch.zeros((), device=self.accelerator.device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self._one)  # scale 1: check only
        inner.found_inf, inner.grad_scale = found_inf, None  # what GradScaler hands a fused optimizer
        try:
            opt.step()
        finally:
            del inner.found_inf, inner.grad_scale
        return found_inf

    def take_means(self) -> torch.Tensor:
        """Means over the finite steps since the last call (device, `STAT_TAGS` order; NaN if there were
        none); resets the sums."""
        means = self.sums / self.finite_steps
        self.sums.zero_()
        self.finite_steps.zero_()
        return means

    def take_health(self) -> torch.Tensor:
        """`HEALTH_TAGS` counts since the last call (device); resets them."""
        counts = self.health.clone()
        self.health.zero_()
        return counts

    def nonfinite_flags(self, limit: int) -> torch.Tensor:
        """Device [1 if some streak of non-finite steps reached `limit`, 1 if the last step was non-finite]."""
        return torch.stack([(self.worst_streak >= limit).float(), (self.streak > 0).float()])

    def loss_scale(self) -> torch.Tensor | None:
        """The fp16 loss scale (device), or None without a scaler."""
        scaler = self.accelerator.scaler
        return scaler._get_scale_async() if scaler is not None else None
