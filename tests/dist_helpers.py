"""Helpers for the multi-process tests: small synthetic shards, real launches, expected noise states."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba

REPO = Path(__file__).resolve().parents[1]
# tiny models and batches: every multi-process test stays within seconds per launch on 2 cores
TINY = ["model.ngf=8", "model.ndf=8", "model.nz=16", "train.batch_size=8", "data.workers=1", "data.shuffle_buffer=16"]
NZ, BATCH = 16, 8


def synthetic_shards(root: Path, count: int = 150, shard_size: int = 25) -> Path:
    """Synthetic CelebA (4 modes, the flat style: small PNGs, quick to decode) packed into shards of
    `shard_size`: the last shard is shorter."""
    source = write_synthetic_celeba(root / "celeba", count, 4, seed=0, style="flat")
    out = root / "shards"
    build_shards(source, out, shard_size=shard_size, workers=1)
    return out


def train_split_counts(shards: Path) -> list[int]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [s["samples"] for s in manifest["splits"]["train"]["shards"]]


def launch_env() -> dict[str, str]:
    """Two CPU ranks with gloo: ACCELERATE_USE_CPU=1 is what makes torchrun's processes one run."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """A real `torchrun --nproc_per_node N` launch; a hang fails the test at `timeout` instead of blocking CI."""
    return subprocess.run(torchrun_cmd(nproc, *args), cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_accelerate_cpu(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/accelerate/cpu.yaml` (two CPU processes), as a user runs it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu.yaml",
           "--main_process_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=timeout)


def expected_noise_state(seed: int, rank: int, steps: int, batch: int = BATCH, nz: int = NZ) -> torch.Tensor:
    """The z generator's state after `steps` GAN steps on `rank`, replayed with plain torch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * rank + 1)
    for _ in range(steps):
        torch.randn(batch, nz, 1, 1, generator=g)
    return g.get_state()
