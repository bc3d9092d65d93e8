"""One GAN training step in the lab's order, with statistics kept on the device.

1. D on a real batch (target `real_label`) and on G(z).detach() (target 0); one D update.
2. G through the *updated* D with those same fakes (target 1); one G update.
3. With `ema_decay` > 0, G's moving average (ema.py) takes one step toward the new weights.

The G step runs D's bare module with D's parameters frozen, so D's weight gradients are
neither computed nor all-reduced. Nothing here reads a value back to the host: the named
statistics (stats.py) accumulate on the device and the trainer reads them every `log.every` steps.

Skipping a bad step needs no host sync either. Each optimizer's gradients are checked on the
device after DDP's all-reduce (so every rank skips the same steps), and the fused Adam optimizers
skip their update from that device flag (`step_unless`). With fp16 the grad scaler makes the same
check and skips by itself. A loss that is not finite is turned into NaN gradients, so one rank's
bad loss skips the step everywhere.

The step owns its state (weights, optimizers, the noise generator, statistics, the non-finite
streak, G's moving average) and offers what a CUDA graph of it needs (`make_capturable`, `noise` to register with the
graph, `restore_after_failed_capture`, `snapshot`/`restore`); fastpath.py only drives it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from dcgan_dist.config import LossConfig
from dcgan_dist.ema import GeneratorEMA
from dcgan_dist.seeds import noise_seed
from dcgan_dist.stats import RunningStats

# Device flags of `GANStep.nonfinite_flags`; the trainer reduces them with the statistics but logs neither.
NONFINITE_LIMIT_REACHED = "nonfinite/limit_reached"
LAST_STEP_NONFINITE = "nonfinite/last_step"


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


def gradients_nonfinite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """1.0 if some gradient of `optimizer`'s parameters has a NaN or infinite element, else 0.0 (device, no sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros((), device=optimizer.param_groups[0]["params"][0].device)
    # the largest |element|: NaN or inf exactly when some element is, and no sum that could overflow
    largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))
    return (~torch.isfinite(largest)).float()


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Step `optimizer` unless the device flag `found_inf` is 1.0, without reading the flag on the host.

    PRIVATE TORCH PROTOCOL, the only one this project relies on: torch.amp.GradScaler hands its verdict
    to an optimizer that supports it (fused Adam) as the attributes `found_inf` and `grad_scale` (None:
    the gradients are not scaled), which its `step()` reads; a flagged step changes neither the weights
    nor Adam's state. tests/test_step.py::test_torch_private_skip_protocol fails when torch changes it.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    inner.found_inf, inner.grad_scale = found_inf, None
    try:
        optimizer.step()
    finally:
        del inner.found_inf, inner.grad_scale


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """`model`'s parameters need no gradient inside the block (also when the block raises)."""
    model.requires_grad_(False)
    try:
        yield
    finally:
        model.requires_grad_(True)


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
    """The training step, its networks and optimizers, its noise generator and its running statistics."""

    def __init__(self, accelerator: Accelerator, G: nn.Module, D: nn.Module,
                 opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, loss: LossConfig, nz: int, seed: int,
                 ema_decay: float = 0.0, ema_rampup: float = 0.0, g_steps: int = 1):
        self.accelerator, self.G, self.D, self.opt_g, self.opt_d = accelerator, G, D, opt_g, opt_d
        self.loss, self.nz, self.g_steps = loss, nz, g_steps
        for opt in (opt_g, opt_d):
            if not all(group.get("fused") for group in opt.param_groups):
                raise ValueError("GANStep needs optimizers that skip a step from a device flag: "
                                 "torch.optim.Adam(..., fused=True)")
        # z has its own generator: data-loader workers draw from the global RNG, and a resumed
        # run must draw exactly the noise an uninterrupted one would.
        self.noise = torch.Generator(device=accelerator.device)
        self.noise.manual_seed(noise_seed(seed, accelerator.process_index))
        self.D_bare = accelerator.unwrap_model(D)  # keeps accelerate's autocast wrapper, drops DDP
        device = accelerator.device
        self.stats = RunningStats(device)
        self.streak = torch.zeros((), device=device)  # consecutive non-finite steps up to now
        self.worst_streak = torch.zeros((), device=device)
        # the moving average of G (ema.py), or None with ema_decay 0; every rank keeps the same one
        self.ema = GeneratorEMA(accelerator.unwrap_model(G), ema_decay, ema_rampup) if ema_decay > 0 else None

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) on the host -> float in [-1, 1] on the device (the lab's scaling)."""
        x = images.to(self.accelerator.device, non_blocking=True)
        return x.float().div_(127.5).sub_(1.0)

    def __call__(self, images: torch.Tensor, collect_grad_norms: bool = False) -> StepOutput:
        acc, stats = self.accelerator, self.stats
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

        # G step through the updated D, same fakes; D's weights get no gradient.
        with frozen(self.D_bare):
            after_logits = self.D_bare(fake)
        loss_g = generator_loss(after_logits, self.loss.generator)
        acc.backward(nan_gradients_if_nonfinite(loss_g))
        if collect_grad_norms:
            acc.unscale_gradients(self.opt_g)
            out.grad_norms_g = layer_grad_norms(self.G)
        skipped_g = self._optimizer_step(self.opt_g)
        # train.g_steps > 1 (the lab's unbalanced game): more G updates against the same D, each on new z;
        # the statistics are the first update's, a skip in any of them counts
        for _ in range(self.g_steps - 1):
            z = torch.randn(real.shape[0], self.nz, 1, 1, device=acc.device, generator=self.noise)
            with frozen(self.D_bare):
                again = generator_loss(self.D_bare(self.G(z)), self.loss.generator)
            acc.backward(nan_gradients_if_nonfinite(again))
            skipped_g = torch.maximum(skipped_g, self._optimizer_step(self.opt_g))
        if self.ema is not None:
            self.ema.update()

        with torch.no_grad():
            finite = torch.isfinite(loss_d) & torch.isfinite(loss_g)
            if acc.scaler is not None:  # overflow skips are the scaler's routine; only bad losses are non-finite steps
                stats.count("amp/skipped_steps", skipped_d + skipped_g)
                nonfinite = (~finite).float()
            else:  # the skip flags already include bad losses, on every rank alike
                nonfinite = torch.maximum(skipped_d, skipped_g)
            stats.count("train/nonfinite_steps", nonfinite)
            stats.report("loss/D", loss_d)
            stats.report("loss/G", loss_g)
            stats.report("D(x)", torch.sigmoid(real_logits.float()).mean())
            stats.report("D(G(z))/before_D_step", torch.sigmoid(out.fake_logits.float()).mean())
            stats.report("D(G(z))/after_D_step", torch.sigmoid(after_logits.detach().float()).mean())
            stats.report("D/positive_logits_real", (real_logits > 0).float().mean())
            stats.report("D/positive_logits_fake", (out.fake_logits > 0).float().mean())
            stats.end_step(counted=finite)  # non-finite steps are left out of the means
            # in place, like every running tensor: a CUDA graph of this step replays into the tensors it captured
            self.streak.add_(1).mul_(nonfinite)
            torch.maximum(self.worst_streak, self.streak, out=self.worst_streak)
        return out

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> torch.Tensor:
        """Step `opt` unless its gradients are not finite, then clear them; 1.0 if skipped, else 0.0 (device)."""
        skipped = gradients_nonfinite(opt)
        if self.accelerator.scaler is not None:
            opt.step()  # fp16: the scaler makes the same check, skips, and lowers its scale (accelerate updates it)
        else:
            step_unless(opt, skipped)
        opt.zero_grad(set_to_none=True)
        return skipped

    def nonfinite_flags(self, limit: int) -> dict[str, torch.Tensor]:
        """Device flags: some streak of non-finite steps reached `limit`; the last step was non-finite."""
        return {NONFINITE_LIMIT_REACHED: (self.worst_streak >= limit).float(),
                LAST_STEP_NONFINITE: (self.streak > 0).float()}

    def loss_scale(self) -> float | None:
        """The fp16 loss scale (read on the host: call it when logging), or None without a scaler."""
        scaler = self.accelerator.scaler
        return scaler.get_scale() if scaler is not None else None

    # --- what a CUDA graph of the step needs (fastpath.py)

    def make_capturable(self) -> None:
        """Let the optimizers' steps be captured: Adam refuses a capture without this flag; fused math is unchanged."""
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["capturable"] = True

    def restore_after_failed_capture(self, noise_state: torch.Tensor) -> None:
        """Undo the host-side traces of a step whose capture failed (none of its kernels ran): its gradients,
        its half-reported statistics, and the noise generator, replaced by a fresh one in `noise_state` (the old
        one may still count itself as being captured)."""
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        self.stats.discard_step()
        fresh = torch.Generator(device=self.accelerator.device)
        fresh.set_state(noise_state)
        self.noise = fresh

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a step changes, by name, the live tensors themselves: weights and buffers, Adam's
        state, the statistic sums, the non-finite streak and G's moving average (not an fp16 scaler's, which a graph never runs
        with; the noise generator's state is no tensor: `snapshot` adds it)."""
        tensors: dict[str, torch.Tensor] = {}
        for prefix, model, opt in (("G", self.G, self.opt_g), ("D", self.D, self.opt_d)):
            bare = self.accelerator.unwrap_model(model)
            params = dict(bare.named_parameters())
            tensors.update({f"{prefix}.{name}": t for name, t in [*params.items(), *bare.named_buffers()]})
            names = {p: name for name, p in params.items()}
            for p, state in getattr(opt, "optimizer", opt).state.items():
                tensors.update({f"{prefix}.{names[p]}/adam.{key}": t for key, t in state.items() if torch.is_tensor(t)})
        tensors.update(self.stats.state_tensors())
        tensors.update({"nonfinite/streak": self.streak, "nonfinite/worst_streak": self.worst_streak})
        if self.ema is not None:
            tensors.update(self.ema.state_tensors())
        return tensors

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the step's whole state, by name, including the noise generator's ('noise')."""
        snapshot = {name: t.detach().clone() for name, t in self.state_tensors().items()}
        snapshot["noise"] = self.noise.get_state()
        return snapshot

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Put a `snapshot()` back, in place: a captured graph keeps writing into the same tensors."""
        with torch.no_grad():
            for name, t in self.state_tensors().items():
                t.copy_(snapshot[name])
        self.noise.set_state(snapshot["noise"])
