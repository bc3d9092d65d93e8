"""Shared fixtures: small image folders and the location of ../shared."""
from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread per process: the suite runs tiny models and spawns trainer processes on a
# 2-core machine, where more threads only oversubscribe the cores (measured 10x+ slower steps).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(name: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only beside the project in development and CI)")
    return path


def write_image_folder(root: Path, count: int, size: tuple[int, int] = (89, 109), seed: int = 0) -> Path:
    """`count` random RGB JPEGs of width x height `size`, in a nested folder."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = root / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i:06d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), 96)


class PooledPixels(torch.nn.Module):
    """A stand-in FID network: (N, 3, 299, 299) -> (N, 48) average colours of a 4 x 4 grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture(scope="session")
def fid_stand_in(tmp_path_factory) -> Path:
    """A TorchScript file with the FID network's interface that runs in milliseconds, for tests of what
    surrounds the network (the standard one runs at about an image per second on a busy CPU core)."""
    import warnings

    path = tmp_path_factory.mktemp("fid-network") / "pooled.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; FeatureExtractor loads these
        torch.jit.script(PooledPixels()).save(str(path))
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; each test builds its own Accelerator from scratch."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
