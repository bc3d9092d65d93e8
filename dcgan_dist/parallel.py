"""Processes and devices: the Accelerator, BatchNorm across ranks, and the few collectives the loop needs.

Launch with torchrun or `accelerate launch` (launch/accelerate/*.yaml); one process per GPU.
On CPU, several processes need ACCELERATE_USE_CPU=1 (gloo): without it each process believes
it is alone and trains an independent copy, which `build_accelerator` refuses.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast, parse_flag_from_env
from torch import nn

from dcgan_dist.config import Config, ConfigError
from dcgan_dist.cpu import CpuBf16, probe_cpu_bf16
from dcgan_dist.errors import ExplainedError


def launched_world_size() -> int:
    """Processes the launcher started (torchrun / accelerate launch set WORLD_SIZE); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def runs_on_cuda() -> bool:
    """Whether this run's Accelerator will put it on a CUDA GPU."""
    return torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")


def resolve_precision(precision: str, cpu_bf16: CpuBf16 | None = None) -> str:
    """`auto`: bf16 where it pays on the run's device, else `no`. On CUDA: Ampere and later. On a CPU:
    `cpu_bf16`, by default `probe_cpu_bf16()` (AMX-BF16; elsewhere bf16 convolutions are slower than
    fp32, cpu.py). Any other value is returned as it is."""
    if precision != "auto":
        return precision
    if runs_on_cuda():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    return "bf16" if (cpu_bf16 or probe_cpu_bf16()).pays else "no"


def build_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator; the config's `precision` wins over the launcher's mixed_precision (with a note).

    `precision: auto` is resolved here, and `cfg.precision` is set to what it resolved to, so the
    run's log and saved config say what ran; on a CPU one line says why.

    DDP does not broadcast buffers: each rank's BatchNorm keeps its own running statistics, and D's
    two forwards (real, fake) before one backward never trip "modified by an inplace operation".
    """
    auto = cfg.precision == "auto"
    cfg.precision = resolve_precision(cfg.precision)
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, bucket_cap_mb=cfg.perf.ddp_bucket_cap_mb)
    accelerator = Accelerator(mixed_precision=cfg.precision, kwargs_handlers=[ddp])
    launched = launched_world_size()
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(
            f"launch: {launched} processes were started but Accelerate sees {accelerator.num_processes}; "
            "on CPU set ACCELERATE_USE_CPU=1 (e.g. ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m dcgan_dist.train)")
    if auto and accelerator.device.type == "cpu" and accelerator.is_main_process:
        print(f"[dcgan-train] precision auto: {'bf16' if cfg.precision == 'bf16' else 'fp32'} on this CPU "
              f"({probe_cpu_bf16().why})", flush=True)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", cfg.precision)
    if launcher_precision != cfg.precision and accelerator.is_main_process:
        print(f"[dcgan-train] note: the launcher asked for mixed precision {launcher_precision!r}; the run's "
              f"precision {cfg.precision!r} is used (set precision={launcher_precision} to change it)", flush=True)
    if cfg.precision == "fp16" and accelerator.device.type != "cuda":
        raise ConfigError(f"config key 'precision': got 'fp16' on {accelerator.device.type}, expected a CUDA GPU "
                          "for fp16 (Accelerate has no fp16 autocast or loss scaling there); use 'bf16' or 'no'")
    if cfg.ddp.batchnorm == "sync" and accelerator.device.type != "cuda":
        raise ConfigError(f"config key 'ddp.batchnorm': got 'sync' on {accelerator.device.type}, expected CUDA "
                          "devices (SyncBatchNorm); use 'local'")
    return accelerator


def prepare_gan(accelerator: Accelerator, batchnorm: str, G: nn.Module, D: nn.Module,
                opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> tuple:
    """G and D as two separate DDP models (with their optimizers), BatchNorm as `ddp.batchnorm` says.

    `sync` turns every BatchNorm into SyncBatchNorm: same parameters (so the optimizers stay
    valid) and same state_dict keys (so checkpoints and the generator export do not change).
    """
    if batchnorm == "sync":
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    with warnings.catch_warnings():
        # torch deprecates broadcast_buffers for forward_sync_buffers, which Accelerate cannot pass yet;
        # the old flag is the one that syncs no buffers at all, which is what local BatchNorm means.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return tuple(accelerator.prepare(G, D, opt_g, opt_d))


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one; a collective every rank must call."""
    if accelerator.num_processes == 1:
        return flag
    votes = torch.tensor([float(flag)], device=accelerator.device)
    return accelerator.reduce(votes, reduction="sum").item() > 0


class MainProcessFailed(ExplainedError):
    """Raised on the other ranks when the main process failed work they all waited for; it reports the cause."""


_DONE, _VALUE, _FAILED = 0, 1, 2  # on_main_process's outcome


def on_main_process(accelerator: Accelerator, what: str, fn: Callable[[], int | None]) -> int | None:
    """`fn()` on the main process only; its result (an int or None) on every rank.

    The others wait in one broadcast that carries the outcome, not in a barrier: when `fn` raises,
    the main process re-raises it and every other rank raises `MainProcessFailed` (naming `what`), so
    no rank is left waiting forever for a main process that has left.
    """
    if accelerator.num_processes == 1:
        return fn()
    outcome = torch.zeros(2, dtype=torch.int64, device=accelerator.device)  # (status, value)
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            value = fn()
            outcome[0], outcome[1] = (_DONE, 0) if value is None else (_VALUE, value)
        except BaseException as exc:  # KeyboardInterrupt too: the others must not wait for it
            error, outcome[0] = exc, _FAILED
    broadcast(outcome, from_process=0)
    status, value = outcome.tolist()
    if error is not None:
        raise error
    if status == _FAILED:
        raise MainProcessFailed(f"rank {accelerator.process_index}: stopping because the main process could not "
                                f"{what} (its message says why)")
    return value if status == _VALUE else None

