"""The lab's DCGAN: generator and discriminator exactly as specified, with DCGAN initialisation.

The discriminator returns logits. The lab's final Sigmoid is applied by the loss
(BCE-with-logits, numerically the same as Sigmoid + BCELoss and safe under autocast)
and wherever D(x) is reported as a probability.
"""
from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    """z (N, nz) or (N, nz, 1, 1) -> image (N, channels, 64, 64) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3):
        super().__init__()
        self.nz = nz

        def up(cin: int, cout: int, stride: int, pad: int) -> list[nn.Module]:
            return [nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.main = nn.Sequential(
            *up(nz, ngf * 8, 1, 0),  # 1 -> 4
            *up(ngf * 8, ngf * 4, 2, 1),  # 4 -> 8
            *up(ngf * 4, ngf * 2, 2, 1),  # 8 -> 16
            *up(ngf * 2, ngf, 2, 1),  # 16 -> 32
            nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False),  # 32 -> 64
            nn.Tanh(),
        )
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """image (N, channels, 64, 64) -> logits (N,); sigmoid(logits) is the lab's D(x)."""

    def __init__(self, ndf: int = 64, channels: int = 3):
        super().__init__()

        def down(cin: int, cout: int, bn: bool = True) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=False)]
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.main = nn.Sequential(
            *down(channels, ndf, bn=False),  # 64 -> 32
            *down(ndf, ndf * 2),  # 32 -> 16
            *down(ndf * 2, ndf * 4),  # 16 -> 8
            *down(ndf * 4, ndf * 8),  # 8 -> 4
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),  # 4 -> 1; the lab's Sigmoid lives in the loss
        )
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def dcgan_init(model: nn.Module) -> None:
    """Radford et al.: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def sample_with_batch_statistics(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """G(z) normalised with the batch's own statistics, as in training, leaving G's BatchNorm buffers as
    they were. Early in training the running statistics lag far behind the weights, so eval-mode
    samples all look alike even when training is healthy; this is what monitoring must look at."""
    saved = [b.clone() for b in G.buffers()]
    was_training = G.training
    G.train()
    images = G(z).float()
    for buffer, value in zip(G.buffers(), saved):
        buffer.copy_(value)
    G.train(was_training)
    return images


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
