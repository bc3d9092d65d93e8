"""Image value ranges and drawing helpers shared by TensorBoard grids, diagnostics, reports and figures."""
from __future__ import annotations

import torch
from PIL import ImageFont


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [-1, 1] (G's Tanh range) -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels (its fixed bitmap font where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()
