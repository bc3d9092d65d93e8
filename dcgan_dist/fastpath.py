"""The fast path: the same GAN step, run at the speed of the hardware (one GPU, or a CPU).

What it adds to `GANStep` (bf16 autocast, fused Adam and the G step's backward into G alone are the
step's own; bf16 is `precision: auto` on GPUs and CPUs that compute it natively, parallel.py), and why;
docs/performance.md has the measurements:

* channels_last (CUDA and CPUs): G and D keep NHWC weights and activations, the layout cuDNN's and
  oneDNN's fastest convolutions run in, so no transposes run around each convolution.
* cudnn.benchmark (CUDA): a run's shapes never change, so timing cuDNN's algorithms once pays.
* One CUDA graph for the whole step (one CUDA process, no fp16 loss scaler). At batch 128 an eager
  step is about a hundred small kernels whose launches take longer than their arithmetic; replaying
  one captured graph launches them all at once. PyTorch's whole-network recipe: a few eager warm-up
  steps on a side stream (cuDNN autotuning, Adam's state, the allocator, the statistic sums), then
  one capture of the step on a static input buffer, after `GANStep.make_capturable()` and with the
  step's noise generator registered with the graph, so every replay draws new z exactly as an eager
  step would and its checkpointed state stays right. The step updates everything in place (weights,
  Adam moments, BatchNorm running statistics, the statistic sums), so the trainer reads, logs and
  checkpoints the very tensors the replays write. A replay costs the host one batch copy and one launch.

The graph is checked before it is trusted: the first step it would run is run twice from the same
saved state, once as a replay and once eagerly, and the two results (weights, buffers, Adam's state,
statistic sums, the noise generator's next state) must agree (`snapshot_differences`). The run keeps
the eager result either way, so the check costs one extra step's work and never advances the run
twice. If they disagree, or anything in the capture or the check raises, one line says why and every
later step runs eagerly. That check is what lets `perf.cuda_graph` default to true.

What the capture fixes: the learning rates and betas (no scheduler changes them) and the optimizer
state tensors (train.py loads a checkpoint before the first step, so before the capture).
Where the graph cannot apply, steps run eagerly and the reason is logged once.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn

from dcgan_dist.config import PerfConfig
from dcgan_dist.errors import summary
from dcgan_dist.step import GANStep, StepOutput

WARMUP_STEPS = 3  # eager steps on a side stream before the capture, as in PyTorch's one-GPU recipe
# Replay and eager step agree when, per tensor, |replay - eager| <= CHECK_ATOL * sqrt(n) + CHECK_RTOL * |eager|
# (L2 norms over the whole tensor); snapshot_differences says why these values.
CHECK_RTOL, CHECK_ATOL = 1e-3, 1e-6
NAMES_SHOWN = 5  # differing tensors named in the log line


def fast_memory_format(perf: PerfConfig, device: torch.device) -> torch.memory_format:
    """channels_last where it pays (with `perf.channels_last`): on CUDA, and on a CPU in fp32 and bf16 alike
    (oneDNN's convolutions, 1.1-1.35x for the lab's step, docs/performance.md); else the plain layout."""
    pays = device.type in ("cuda", "cpu")
    return torch.channels_last if perf.channels_last and pays else torch.contiguous_format


def prepare_models(perf: PerfConfig, device: torch.device, *models: nn.Module) -> None:
    """Turn on cuDNN autotuning (CUDA) and put the models in the fast layout, in place.

    The parameters stay the same objects, so optimizers built on them before or after stay valid.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = perf.cudnn_benchmark
    if fast_memory_format(perf, device) == torch.channels_last:
        for model in models:
            model.to(memory_format=torch.channels_last)


def graph_blocker(perf: PerfConfig, accelerator: Accelerator) -> str | None:
    """Why the whole step cannot be one CUDA graph here, or None when it can."""
    if not perf.cuda_graph:
        return "perf.cuda_graph is false"
    if accelerator.device.type != "cuda":
        return f"the device is {accelerator.device.type}, and CUDA graphs need a CUDA GPU"
    if accelerator.num_processes > 1:
        return f"{accelerator.num_processes} processes: DDP's all-reduce is not captured, so multi-GPU steps run eagerly"
    if accelerator.scaler is not None:
        return "precision fp16: its loss scaler reads the scale on the host every step (bf16 needs no scaler)"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register the noise generator with a graph"
    return None


def snapshot_differences(eager: dict[str, torch.Tensor], replayed: dict[str, torch.Tensor],
                         rtol: float = CHECK_RTOL, atol: float = CHECK_ATOL) -> list[str]:
    """What differs between two snapshots of the step's state (`GANStep.snapshot`), one phrase per
    tensor; empty when they agree.

    Floating-point tensors agree when ||replayed - eager|| <= atol * sqrt(n) + rtol * ||eager|| (L2 over
    the whole tensor) with NaNs in the same places. An atomic add in another order may round a few
    gradient elements differently, and where a gradient is at rounding level Adam's early steps can
    then move that weight by 2 lr: a handful of such elements stay far inside the tolerance, while a
    missed or doubled update or another draw of z changes every element of a layer (about 1e-2 of a
    convolution's norm at lr 2e-4). Everything else (the noise generator's state, step counters) must
    be equal.
    """
    problems = [f"{name} (missing from the replayed step)" for name in eager if name not in replayed]
    problems += [f"{name} (missing from the eager step)" for name in replayed if name not in eager]
    for name in eager.keys() & replayed.keys():
        a, b = eager[name], replayed[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name} ({a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)})")
        elif not a.is_floating_point():
            if not torch.equal(a, b):
                problems.append(f"{name} (not equal)")
        else:
            a, b = a.double(), b.double()
            nan = torch.isnan(a)
            if not torch.equal(nan, torch.isnan(b)):
                problems.append(f"{name} (NaN in different places)")
                continue
            a, b = a.masked_fill(nan, 0.0), b.masked_fill(nan, 0.0)
            diff = float(torch.linalg.vector_norm(b - a))
            scale = float(torch.linalg.vector_norm(a))
            if not diff <= atol * math.sqrt(a.numel()) + rtol * scale:  # `not <=`: a NaN difference fails too
                problems.append(f"{name} (relative difference {diff / scale:.1e})" if scale else
                                f"{name} (difference {diff:.1e})")
    return sorted(problems)


def checked_replay(step: GANStep, replay: Callable[[], None], batch: torch.Tensor) -> tuple[StepOutput, list[str]]:
    """One step from the same saved state twice: `replay()`, then, with the state put back, an eager step
    on `batch`. The eager step's result stays (the run advances by one step); returns its output and
    what differed (`snapshot_differences`). If anything raises, the state before the step is put back."""
    before = step.snapshot()
    try:
        replay()
        replayed = step.snapshot()
        step.restore(before)
        out = step(batch)
        return out, snapshot_differences(step.snapshot(), replayed)
    except BaseException:
        step.restore(before)
        raise


class StepRunner:
    """Feeds host batches to a `GANStep`: eagerly, or after warm-up as replays of one captured CUDA graph.

    Called like the step (`runner(images, collect_grad_norms=False) -> StepOutput`). A replay returns
    the captured outputs, which the next step overwrites. Steps that collect gradient norms, and
    batches of another shape than the captured one, run eagerly between replays (the graph holds no
    norms; its shapes are fixed).
    """

    def __init__(self, step: GANStep, perf: PerfConfig, log: Callable[[str], None], warmup_steps: int = WARMUP_STEPS):
        self.step, self.log, self.warmup_steps = step, log, warmup_steps
        self.device = step.accelerator.device
        self.memory_format = fast_memory_format(perf, self.device)
        self.graph_off = graph_blocker(perf, step.accelerator)  # None: the graph is (to be) used
        self.graph: torch.cuda.CUDAGraph | None = None
        self.checked = False  # whether the graph's first replay has been checked against an eager step
        self.out: StepOutput | None = None  # the captured step's outputs, rewritten by every replay
        self.static: torch.Tensor | None = None  # the captured input batch (uint8, device, fast layout)
        self.warmed = 0
        self._noted: set[str] = set()
        layout = "channels_last" if self.memory_format == torch.channels_last else "contiguous"
        autotune = self.device.type == "cuda" and torch.backends.cudnn.benchmark
        how = (f"one CUDA graph of the whole step after {warmup_steps} eager warm-up steps, its first replay "
               "checked against an eager step" if self.graph_off is None else f"eager steps ({self.graph_off})")
        log(f"[dcgan-train] fast path: precision {step.accelerator.mixed_precision}, {layout} layout, "
            f"cuDNN autotuning {'on' if autotune else 'off'}, fused Adam; {how}")

    def __call__(self, images: torch.Tensor, collect_grad_norms: bool = False) -> StepOutput:
        if self.graph_off is not None:
            return self.step(self._on_device(images), collect_grad_norms)
        if not self._stage(images):
            self._note(f"a batch of shape {tuple(images.shape)} is not the captured {tuple(self.static.shape)}; "
                       "such batches run eagerly")
            return self.step(self._on_device(images), collect_grad_norms)
        if collect_grad_norms:
            self._note("steps that collect gradient norms (diagnostics) run eagerly: the graph computes none")
            return self.step(self.static, collect_grad_norms=True)
        if self.graph is None:
            if self.warmed < self.warmup_steps:
                return self._warm_up()
            if not self._capture():
                return self.step(self.static)
        if not self.checked:
            return self._checked_first_replay()
        self.graph.replay()
        return self.out

    def _note(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            self.log(f"[dcgan-train] fast path: {message}")

    def _eager_from_now_on(self, reason: str) -> None:
        self.graph_off, self.graph, self.out = reason, None, None
        self.log(f"[dcgan-train] fast path: WARNING: eager steps from here on: {reason}")

    def _on_device(self, images: torch.Tensor) -> torch.Tensor:
        """The batch for an eager step: on the device in the models' layout."""
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _stage(self, images: torch.Tensor) -> bool:
        """Copy the batch into the static input; False if its shape or dtype is not the static one.

        A host batch goes through a staging buffer on a copy stream, so its transfer overlaps the
        previous replay; the layout change to channels_last happens in the device-to-device copy.
        """
        if self.static is None:
            self.static = torch.empty(images.shape, dtype=images.dtype, device=self.device,
                                      memory_format=self.memory_format)
            self._staging = torch.empty(images.shape, dtype=images.dtype, device=self.device)
            self._copy_stream, self._side_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
            self._staged, self._staging_free = torch.cuda.Event(), torch.cuda.Event()
        if images.shape != self.static.shape or images.dtype != self.static.dtype:
            return False
        main = torch.cuda.current_stream(self.device)
        if images.device.type == "cuda":
            self.static.copy_(images)
            return True
        self._copy_stream.wait_event(self._staging_free)  # the previous batch has left the staging buffer
        with torch.cuda.stream(self._copy_stream):
            self._staging.copy_(images, non_blocking=True)
            self._staged.record()
        main.wait_event(self._staged)
        self.static.copy_(self._staging)
        self._staging_free.record(main)
        return True

    def _warm_up(self) -> StepOutput:
        """One real training step, eagerly on a side stream (cuDNN autotuning and lazy state happen here)."""
        main = torch.cuda.current_stream(self.device)
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream):
            out = self.step(self.static)
        main.wait_stream(self._side_stream)
        self.warmed += 1
        return out

    def _capture(self) -> bool:
        """Capture one step on the static batch (nothing runs yet); on failure log why and stay eager."""
        step = self.step
        noise_state = step.noise.get_state()
        try:
            step.make_capturable()
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(step.noise)  # each replay advances z's generator like an eager step
            # thread_local: the DataLoader's pin-memory thread keeps allocating pinned memory meanwhile,
            # which global mode would count against the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = step(self.static)
        except Exception as exc:  # noqa: BLE001 - any capture failure means eager steps, with the reason
            step.restore_after_failed_capture(noise_state)
            torch.cuda.synchronize(self.device)
            self._eager_from_now_on(f"the capture failed ({summary(exc)})")
            return False
        self.graph, self.out = graph, out
        return True

    def _checked_first_replay(self) -> StepOutput:
        """The graph's first step, run as a replay and eagerly from the same state and compared; the eager
        result stays. On a difference or an error the graph is dropped and the run goes on eagerly."""
        try:
            out, differences = checked_replay(self.step, self.graph.replay, self.static)
        except Exception as exc:  # noqa: BLE001 - the state before the step is back: go on eagerly from it
            self._eager_from_now_on(f"the CUDA graph's self-check failed ({summary(exc)})")
            return self.step(self.static)
        self.checked = True
        if differences:
            shown = ", ".join(differences[:NAMES_SHOWN]) + (f" and {len(differences) - NAMES_SHOWN} more"
                                                            if len(differences) > NAMES_SHOWN else "")
            self._eager_from_now_on(f"the CUDA graph's replay of a step differs from the eager step in {shown}")
        else:
            self.log("[dcgan-train] fast path: CUDA graph self-check passed (a replay matches the eager step)")
        return out
