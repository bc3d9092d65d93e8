"""Training on a CPU at the hardware's speed: does bf16 pay on this CPU, and how many torch threads and
loader workers a process gets. docs/performance.md ("Training on a CPU") has the measurements behind the rules.

bf16 pays on a CPU only where oneDNN runs its convolutions on AMX-BF16 tiles (Intel Xeon since Sapphire
Rapids): the lab's step 1.7x (width 64) to 2.9x (width 32) faster than fp32. AVX512-BF16 alone (Cooper
Lake, AMD Zen 4, or a virtual machine that hides AMX) computes bf16 dot products natively, yet oneDNN's
bf16 convolutions on it were measured slower than fp32 (0.6-0.9x for the lab's step); without either,
oneDNN converts every bf16 value to fp32 and back around fp32 arithmetic. So `precision: auto` picks bf16
on AMX-BF16 only; `precision: bf16` is still there to choose by hand.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Mapping

from dcgan_dist.config import Config


@dataclass(frozen=True)
class CpuBf16:
    """Whether bf16 pays on this CPU, and the reason in a few words (for the run's log)."""

    pays: bool
    why: str


def bf16_pays(capabilities: Mapping[str, Any], onednn_bf16: bool) -> CpuBf16:
    """Decide from a CPU's capabilities (`torch.cpu.get_capabilities()`) and whether oneDNN runs bf16
    kernels on it (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`). Both must say yes: oneDNN's own
    check accepts any AVX512 CPU, where bf16 is emulated; the capability flags alone would accept a torch
    built without oneDNN. Only x86 is trusted: bf16 on ARM CPUs is unmeasured here, so they stay fp32."""
    arch = str(capabilities.get("architecture", "unknown"))
    if arch not in ("x86_64", "x86", "i386", "AMD64"):
        return CpuBf16(False, f"bf16 on {arch} CPUs is not measured with this trainer")
    if capabilities.get("amx_bf16"):
        if not onednn_bf16:
            return CpuBf16(False, "the CPU has AMX-BF16 but this torch's oneDNN runs no bf16 kernels")
        return CpuBf16(True, "the CPU computes bf16 convolutions on AMX-BF16")
    if capabilities.get("avx512_bf16"):
        return CpuBf16(False, "AVX512-BF16 without AMX-BF16: bf16 convolutions measured slower than fp32")
    return CpuBf16(False, "no AMX-BF16 or AVX512-BF16: bf16 would be emulated, slower than fp32")


@functools.lru_cache(maxsize=None)
def probe_cpu_bf16() -> CpuBf16:
    """`bf16_pays` for the CPU this process runs on, from torch's own probes (cpuinfo, oneDNN)."""
    import torch

    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    onednn = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bf16_pays(capabilities, onednn)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which taskset, cgroup cpusets and SLURM set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuPlan:
    """A process's torch threads and loader workers, and why (one phrase, for the run's log)."""

    threads: int
    workers: int
    why: str

    def line(self) -> str:
        return f"[dcgan-train] CPU: {self.threads} torch threads, {self.workers} loader workers ({self.why})"


def plan_cpu(*, cores: int, local_processes: int, workers: int, threads: int | str, default_threads: int) -> CpuPlan:
    """Threads and workers for one of `local_processes` training processes on a machine with `cores` usable CPUs.

    * Workers: `data.workers`, but never more than this process's share of the cores (more only queue up,
      and PyTorch's DataLoader warns about them).
    * Threads (`perf.cpu_threads: auto`): torch's own default for this process (`default_threads`: physical
      cores, or OMP_NUM_THREADS, or Accelerate's split between CPU processes), at most this process's share.
      The loader's workers are not subtracted: a worker decodes a batch in a few percent of the time a CPU
      step takes and sleeps otherwise, while a compute thread given up costs the step a whole core.
    """
    share = max(1, cores // max(1, local_processes))
    reasons = []
    if workers > share:
        reasons.append(f"data.workers {workers} capped at {share}, this process's cores")
        workers = share
    if threads == "auto":
        threads = max(1, min(default_threads, share))
        reasons.append(f"perf.cpu_threads auto: {'all' if threads == share else threads} of {share} cores "
                       "for compute; a loader worker needs a few percent of one")
    else:
        reasons.append("perf.cpu_threads")
    return CpuPlan(int(threads), workers, "; ".join(reasons))


def apply_cpu_plan(cfg: Config, processes: int) -> CpuPlan:
    """Choose (`plan_cpu`) and apply this process's torch threads and loader workers; `cfg.data.workers` is
    set to the workers chosen, so the saved config says what ran. The processes on this machine are the
    launcher's LOCAL_WORLD_SIZE, else all `processes` of the run."""
    import torch

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    plan = plan_cpu(cores=usable_cores(), local_processes=local_processes, workers=cfg.data.workers,
                    threads=cfg.perf.cpu_threads, default_threads=torch.get_num_threads())
    torch.set_num_threads(plan.threads)
    cfg.data.workers = plan.workers
    return plan
