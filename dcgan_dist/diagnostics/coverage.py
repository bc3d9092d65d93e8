"""Mode coverage on data with known modes: which modes a generator's samples fall into.

A multinomial logistic regression on 8x8 average-pooled colour pixels, fitted on labelled real
samples. The synthetic faces' modes differ in background hue and pattern, hair, skin, glasses
and hats, all visible at 8x8, so this small model separates them; its accuracy on held-out real
samples is reported beside the coverage so the number can be trusted (or not).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcgan_dist.imaging import to_unit

POOLED = 8  # pixels per side the classifier sees


def _features(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(to_unit(images), POOLED).flatten(1)


@dataclass
class ModeClassifier:
    """Standardised pooled pixels -> logits over `modes` classes."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor  # (modes, features)
    bias: torch.Tensor

    @property
    def modes(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, modes: int, l2: float = 1e-3) -> "ModeClassifier":
        """Full-batch L-BFGS on the cross-entropy plus a small L2 penalty (deterministic)."""
        x = _features(images)
        mean, scale = x.mean(0), x.std(0) + 1e-3
        x = (x - mean) / scale
        weight = torch.zeros(modes, x.shape[1], requires_grad=True)
        bias = torch.zeros(modes, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(mean, scale, weight.detach(), bias.detach())

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The mode index of each image (uint8 or [-1, 1] float, any device)."""
        x = (_features(images.cpu()) - self.mean) / self.scale
        return (x @ self.weight.T + self.bias).argmax(1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(images) == labels).float().mean().item()


def modes_present(predicted: torch.Tensor, modes: int, min_count: int) -> int:
    """How many modes receive at least `min_count` of the predicted samples."""
    return int((torch.bincount(predicted, minlength=modes) >= min_count).sum())
