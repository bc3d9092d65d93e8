"""Which generator weights, and how images are drawn from them.

Weights: a run directory holds the export RUN/generator.safetensors, written at every checkpoint: G's
exponential moving average when the run keeps one (model.ema_decay > 0), else G itself; the export's
metadata says which. An EMA run also holds G itself as RUN/generator_raw.safetensors. With a run
directory, no `--weights` takes RUN/generator.safetensors (the run's best guess), `--weights ema` the
average (an error for a run without one) and `--weights raw` G itself. A .safetensors file given
directly is used as it is.

BatchNorm statistics (`bn`), always explicit because they change the images:

* "batch" (default): each batch is normalised with its own statistics, as in training and in the
  trainer's sample grids; G's running buffers are left untouched. Images then depend on the batch
  they are drawn in (its size, the other latents); batches are `batch_size` consecutive latents.
* "running": eval mode, normalised with the running averages saved with the weights. Early in
  training those lag far behind the weights and every image looks alike.

Latents are drawn on the CPU from torch.Generator seeded with `seed`, all at once, so the images do
not depend on the device or on how they are batched for the feature network. Images leave as uint8
(torchvision's save_image rounding), the form real images come in.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from dcgan_dist.checkpoint import GENERATOR_EXPORT, RAW_GENERATOR_EXPORT, export_weights, load_generator
from dcgan_dist.errors import summary
from dcgan_dist.imaging import to_unit
from dcgan_dist.models import sample_with_batch_statistics
from dcgan_dist.quality import QualityError

WEIGHTS = ("raw", "ema")
BN_MODES = ("batch", "running")
BATCH_SIZE = 64  # the trainer's fixed-noise grid


def weights_file(path: Path, weights: str | None) -> Path:
    """The .safetensors file for a run directory and `weights` (None: the run's export, the EMA when it
    keeps one), or the file given."""
    path = Path(path)
    if path.is_dir():
        raw = path / RAW_GENERATOR_EXPORT
        if weights == "raw" and raw.is_file():
            return raw
        file = path / GENERATOR_EXPORT
        if not file.is_file():
            raise QualityError(f"{file}: absent, expected the generator export written at each checkpoint")
        if weights == "ema" and weights_kind(file) != "ema":
            raise QualityError(f"{file}: holds G itself, this run keeps no moving average of G "
                               "(model.ema_decay 0); use --weights raw")
        return file
    if not path.is_file():
        raise QualityError(f"{path}: no such file or run directory, expected RUN_DIR or a G .safetensors file")
    if weights is not None:
        raise QualityError(f"--weights {weights}: selects a file in RUN_DIR; {path} is a file, "
                           "pass it without --weights")
    return path


def weights_kind(path: Path) -> str:
    """"ema" or "raw": which weights a generator export holds (its metadata)."""
    try:
        return export_weights(path)
    except Exception as e:  # safetensors raises its own types for a damaged header
        raise QualityError(f"{path}: not a dcgan_dist generator export ({summary(e)})") from None


def load(path: Path) -> tuple[nn.Module, str]:
    """The generator in a dcgan_dist export (no pickle) and the file's sha256."""
    try:
        G = load_generator(path)
    except Exception as e:  # safetensors, json and torch each raise their own types for a damaged file
        raise QualityError(f"{path}: not a dcgan_dist generator export ({summary(e)})") from None
    return G, hashlib.sha256(Path(path).read_bytes()).hexdigest()


def latents(n: int, nz: int, seed: int) -> torch.Tensor:
    """(n, nz, 1, 1) standard normal latents, the same on every device."""
    return torch.randn(n, nz, 1, 1, generator=torch.Generator().manual_seed(seed))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """G's [-1, 1] floats -> uint8 on the CPU, rounded as torchvision.utils.save_image rounds."""
    return to_unit(images.cpu()).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, bn: str, *, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """uint8 (N, 3, 64, 64) images of latents z, `batch_size` at a time, with BatchNorm mode `bn`."""
    if bn not in BN_MODES:
        raise ValueError(f"bn: got {bn!r}, expected one of {', '.join(BN_MODES)}")
    device = next(G.parameters()).device
    out = []
    for start in range(0, z.shape[0], batch_size):
        batch = z[start:start + batch_size].to(device)
        if bn == "batch":
            out.append(to_uint8(sample_with_batch_statistics(G, batch)))
        else:
            out.append(to_uint8(G.eval()(batch)))
    return torch.cat(out)


@torch.no_grad()
def generate_with_statistics_of(G: nn.Module, z: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """uint8 images of z, each normalised with the batch statistics of the `reference` latents (not of z).

    For interpolation frames: a batch of points along one path is far from a random batch, and would
    be normalised by its own, highly correlated statistics. The reference batch's per-layer mean and
    (biased) variance are put in the running buffers and z runs in eval mode, which computes exactly the
    training-mode normalisation with those statistics; the buffers are restored afterwards.
    """
    device = next(G.parameters()).device
    layers = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    captured = {}

    def capture(module, inputs, _output):
        x = inputs[0].float()
        captured[module] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))

    hooks = [m.register_forward_hook(capture) for m in layers]
    try:
        sample_with_batch_statistics(G, reference.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    was_training = G.training
    try:
        for m in layers:
            m.running_mean.copy_(captured[m][0])
            m.running_var.copy_(captured[m][1])
        return to_uint8(G.eval()(z.to(device)))
    finally:
        for m, (mean, var) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        G.train(was_training)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between latents a and b (same shape) at fractions t (T,): (T, *a.shape).

    Gaussian latents concentrate near a sphere; a straight line between two of them passes through
    improbably short vectors, the great circle does not (White 2016)."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = (fa @ fb / (fa.norm() * fb.norm())).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    t = t.double().view(-1, 1)
    if omega.abs() < 1e-6:  # (nearly) parallel: the arc is a line
        out = (1 - t) * fa + t * fb
    else:
        out = (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / torch.sin(omega)
    return out.to(a.dtype).view(-1, *a.shape)
