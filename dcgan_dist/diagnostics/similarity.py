"""Sample diversity: mean pairwise MS-SSIM, and the spread of samples in a fixed feature space.

A collapsed generator's samples resemble each other far more than real faces do (Odena et al.
2017, who compare the mean MS-SSIM of generated pairs with that of real pairs). MS-SSIM is
sized here for 64x64 images: three scales (64, 32, 16 pixels) with a 7x7 Gaussian window
(sigma 1.5), so the coarsest scale still holds a 10x10 map of valid windows. The weights are
the first three of Wang et al.'s five, renormalised to sum to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcgan_dist.imaging import to_unit

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)  # Wang, Simoncelli & Bovik 2003, scales 1-3
WINDOW, SIGMA = 7, 1.5
C1, C2 = 0.01 ** 2, 0.03 ** 2  # for a dynamic range of 1


def _band(size: int, device: torch.device) -> torch.Tensor:
    """(size - 6, size) matrix whose rows are the 7-tap Gaussian at each valid position."""
    r = torch.arange(WINDOW, dtype=torch.float32, device=device) - (WINDOW - 1) / 2
    g = torch.exp(-r ** 2 / (2 * SIGMA ** 2))
    band = torch.zeros(size - WINDOW + 1, size, device=device)
    for k in range(size - WINDOW + 1):
        band[k, k:k + WINDOW] = g / g.sum()
    return band


def _gaussian_filter(x: torch.Tensor) -> torch.Tensor:
    """Separable 7x7 Gaussian over each channel, valid positions only.

    Written as two matrix products with banded matrices: on CPUs this is ~30x faster than a
    depthwise conv2d, which is what keeps the diagnostics cheap enough to leave on.
    """
    rows, cols = _band(x.shape[-2], x.device), _band(x.shape[-1], x.device)
    return rows @ x @ cols.T


def pairwise_ms_ssim(images: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of every unordered pair of `images` (N, C, 64, 64): N(N-1)/2 values in [0, 1], pairs (i, j>i) in row order.

    Each image's local means and variances are filtered once per scale; only the cross term is
    computed per pair, one image against all later ones at a time (broadcast, no gathers).
    Negative contrast-structure terms are clamped to 0 (as is usual), so the fractional powers stay real.
    """
    x = to_unit(images)
    n = x.shape[0]
    weights = torch.tensor(MS_SSIM_WEIGHTS)
    weights = (weights / weights.sum()).tolist()
    result = [torch.ones(n - 1 - i, device=x.device) for i in range(n - 1)]
    for scale, w in enumerate(weights):
        mu, sq = _gaussian_filter(x), _gaussian_filter(x * x)
        var = sq - mu * mu
        last = scale == len(weights) - 1
        for i in range(n - 1):
            later = slice(i + 1, None)
            cov = _gaussian_filter(x[i] * x[later]) - mu[i] * mu[later]
            value = (2 * cov + C2) / (var[i] + var[later] + C2)
            if last:
                value = value * (2 * mu[i] * mu[later] + C1) / (mu[i] ** 2 + mu[later] ** 2 + C1)
            result[i] *= value.mean(dim=(1, 2, 3)).clamp(min=0.0) ** w
        x = F.avg_pool2d(x, 2)
    return torch.cat(result)


def mean_ms_ssim(images: torch.Tensor) -> float:
    """Mean pairwise MS-SSIM: near 1 for copies of one image, much lower for a batch of real faces."""
    return pairwise_ms_ssim(images).mean().item()


# Two samples at least this alike count as one face. Real CelebA pairs average 0.24; a healthy run's 64
# fixed-noise samples (real faces, width 32, step 500) average 0.44 with 62 of 64 distinct at this threshold
# (docs/failure_modes.md).
NEAR_DUPLICATE = 0.8


def distinct_count(pairs: torch.Tensor, n: int, threshold: float = NEAR_DUPLICATE) -> int:
    """How many of n images are distinct, from their `pairwise_ms_ssim` values: in order, an image that is
    at least `threshold` alike to an earlier distinct one is its near-duplicate, any other is distinct.
    n for varied samples; the handful of faces a collapsed generator repeats."""
    alike = torch.zeros(n, n, dtype=torch.bool)
    rows, cols = torch.triu_indices(n, n, offset=1)
    alike[rows, cols] = pairs.cpu() >= threshold
    alike |= alike.T.clone()
    distinct: list[int] = []
    for i in range(n):
        if not alike[i, distinct].any():
            distinct.append(i)
    return len(distinct)


class RandomFeatures(nn.Module):
    """A fixed, randomly initialised conv net: a feature space that needs no download and never trains.

    Random conv features keep enough of an image's layout and colour to tell samples apart, so
    the spread of generated samples in this space, beside that of real samples, is a second,
    independent reading of diversity.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5 if p.dim() > 1
                        else torch.zeros_like(p))
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_unit(images) * 2.0 - 1.0)


def feature_spread(features: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance between feature vectors."""
    return torch.pdist(features.float()).mean().item()
