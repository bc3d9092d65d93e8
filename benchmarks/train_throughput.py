"""Training throughput side by side: a reference-style baseline, this trainer eager, this trainer's fast path.

One run on one machine measures, at two batch sizes (GPU: 128 and 1024):
  (a) `reference`: a loop that behaves like pytorch/examples dcgan/main.py: fp32 eager, the JPEG folder
      decoded and transformed (the lab's Resize + CenterCrop) every epoch in the loader workers, five
      `.item()` reads per step; with 2 and 16 loader workers (small mode: 1 and 2);
  (b) `trainer eager`: `dcgan_dist.train.train` end to end from shards, bf16 and channels_last but no CUDA graph;
  (c) `trainer fast`: the same with the whole fast path (docs/performance.md);
plus the loaders alone, the step alone on a batch already on the device (the same ladder as the
reference's speed-of-light probe), peak GPU memory, and two checks that the fast path trains the same
model: loss and D(x) curves against the eager step's on a fixed seed, and a checkpoint resume.
Figures, machine, versions and command go to benchmarks/results/<date>-<machine>.json.

    python benchmarks/train_throughput.py            # on a GPU: full sizes, under 8 minutes on an H100
    python benchmarks/train_throughput.py --small    # small sizes (the default without a GPU), about a minute

With a GPU every case runs in its own process, so one failure (or a CUDA error) costs only its rows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a plain checkout too (no `pip install -e .` needed)

try:
    import webdataset  # noqa: F401  (the shard loader needs it)
except ImportError:
    sys.exit("train_throughput: the Python package webdataset is missing; install it (docs/performance.md "
             "says how to carry it to a GPU machine) and run again")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dcgan_dist.config import Config, DataConfig, load_config
from dcgan_dist.data.images import lab_transform, list_images
from dcgan_dist.data.loader import ShardBatchSource, read_samples
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.fastpath import StepRunner
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.parallel import build_accelerator
from dcgan_dist.train import build_gan, train

RESULTS = REPO / "benchmarks" / "results"
EAGER = ["perf.cuda_graph=false"]  # (b): everything but the graph
FAST: list[str] = []  # (c): the defaults
PLAIN = ["perf.cuda_graph=false", "perf.channels_last=false", "perf.cudnn_benchmark=false"]


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run measures."""

    images: int  # synthetic CelebA JPEGs (178x218); ~80% are the train split the shards hold
    shard_size: int
    batches: tuple[int, ...]
    reference_workers: tuple[int, ...]
    loader_workers: tuple[int, ...]  # tried alone; the trainer runs with the fastest at each batch size
    ngf: int
    ndf: int
    reference_steps: int  # timed reference steps at the first batch size (fewer at larger ones), after 3 untimed
    step_images: int  # images per timed step-alone loop
    step_warmup: int  # untimed steps first (the fast path's warm-up and capture among them)
    window_images: int  # images per timed trainer interval (after one untimed interval)
    diag_every: int  # the row with diagnostics on: steps between checks (the trainer's default is 50)
    curve_steps: int
    curve_batch: int
    resume_steps: int  # the resume check: K steps, checkpoint, K more; against 2K uninterrupted
    budget_s: float  # cases still waiting when this is spent are skipped (and listed)


FULL = Sizes(images=100_000, shard_size=5000, batches=(128, 1024), reference_workers=(2, 16),
             loader_workers=(4, 8, 12), ngf=64, ndf=64, reference_steps=30, step_images=40_000, step_warmup=10,
             window_images=60_000, diag_every=50, curve_steps=300, curve_batch=128, resume_steps=60, budget_s=450)
SMALL = Sizes(images=480, shard_size=96, batches=(8, 32), reference_workers=(1, 2), loader_workers=(0, 1),
              ngf=8, ndf=8, reference_steps=4, step_images=96, step_warmup=2, window_images=64, diag_every=4,
              curve_steps=24, curve_batch=8, resume_steps=4, budget_s=240)


# ------------------------------------------------------------------------------------------ (a) the reference


class ReferenceImages(Dataset):
    """The reference script's ImageFolder: decode, the lab's transform, scale to [-1, 1], all in the worker."""

    def __init__(self, root: Path):
        self.files = list_images(root)
        self.transform = lab_transform(64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")).float().div_(127.5).sub_(1.0), 0  # ToTensor + Normalize(0.5)


def reference_loader(root: Path, batch: int, workers: int) -> DataLoader:
    """As main.py builds it: shuffled, no pinned memory."""
    return DataLoader(ReferenceImages(root), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


class ReferenceStep:
    """main.py's iteration: fp32, Sigmoid + BCELoss, D's real and fake losses backward separately, the G
    step's backward into D's weights too, Adam (foreach), and five `.item()` reads for its per-step print."""

    def __init__(self, device: torch.device, nz: int, ngf: int, ndf: int, seed: int = 0):
        torch.manual_seed(seed)
        self.device, self.nz = device, nz
        self.G, self.D = Generator(nz, ngf).to(device), Discriminator(ndf).to(device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def __call__(self, real: torch.Tensor) -> tuple[float, ...]:
        real = real.to(self.device)
        b = real.shape[0]
        self.D.zero_grad()
        label = torch.full((b,), 1.0, device=self.device)
        output = torch.sigmoid(self.D(real))
        err_d_real = F.binary_cross_entropy(output, label)
        err_d_real.backward()
        d_x = output.mean().item()
        fake = self.G(torch.randn(b, self.nz, 1, 1, device=self.device))
        label.fill_(0.0)
        output = torch.sigmoid(self.D(fake.detach()))
        err_d_fake = F.binary_cross_entropy(output, label)
        err_d_fake.backward()
        d_g_z1 = output.mean().item()
        self.opt_d.step()
        self.G.zero_grad()
        label.fill_(1.0)
        output = torch.sigmoid(self.D(fake))
        err_g = F.binary_cross_entropy(output, label)
        err_g.backward()
        d_g_z2 = output.mean().item()
        self.opt_g.step()
        return (err_d_real + err_d_fake).item(), err_g.item(), d_x, d_g_z1, d_g_z2


# ------------------------------------------------------------------------------------------ helpers


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None


def row(case: str, label: str, batch: int, images: int, seconds: float, **extra) -> dict:
    rate = images / max(seconds, 1e-9)
    return {"case": case, "label": label, "batch": batch, "img_per_s": round(rate, 1),
            "ms_per_step": round(1000 * batch / rate, 3), "peak_gpu_mib": peak_mib(), **extra}


def config(spec: dict, batch: int, *overrides: str) -> Config:
    return load_config(None, [f"data.source={spec['shards']}", f"train.batch_size={batch}",
                              f"model.ngf={spec['ngf']}", f"model.ndf={spec['ndf']}", "precision=bf16",
                              *overrides])


def fresh_accelerate() -> None:
    """Accelerate keeps process-wide state; every measured setup builds its own Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    reset_peak()


# ------------------------------------------------------------------------------------------ cases


def case_loaders(spec: dict) -> list[dict]:
    """The input pipelines alone: the reference JPEG loader, and the shard loader at each worker count."""
    rows = []
    for workers in spec["reference_workers"]:
        batch = spec["batches"][0]
        loader = iter(reference_loader(Path(spec["jpegs"]), batch, workers))
        for _ in range(3):
            next(loader)
        n = spec["reference_steps"]
        start = time.perf_counter()
        for _ in range(n):
            next(loader)
        rows.append(row("loader", "reference JPEG folder (decode + lab transform per image)", batch, n * batch,
                        time.perf_counter() - start, workers=workers))
    for batch in spec["batches"]:
        for workers in spec["loader_workers"]:
            source = ShardBatchSource(Path(spec["shards"]), DataConfig(source=spec["shards"], workers=workers),
                                      batch_size=batch, rank=0, world_size=1, seed=0)
            start, images = time.perf_counter(), 0
            for epoch in range(2):
                images += sum(len(b.keys) for b in source.batches(epoch))
            rows.append(row("loader", "shards, npy (2 epochs, restarts included)", batch, images,
                            time.perf_counter() - start, workers=workers))
    return rows


def _time_steps(step: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return time.perf_counter() - start


STEP_LADDER = (  # label, precision, perf overrides
    ("this step, fp32 eager, no syncs", "no", PLAIN),
    ("this step, bf16 + channels_last, eager", "bf16", EAGER),
    ("this step, bf16 + channels_last + CUDA graph (fast path)", "bf16", FAST),
    ("this step, fp32 + CUDA graph", "no", ["perf.channels_last=false"]),
)


def case_step(spec: dict) -> list[dict]:
    """One training step on a batch already on the device, from the reference's to the fast path."""
    rows, dev = [], device()
    for batch in spec["batches"]:
        images = read_samples(Path(spec["shards"]), limit=batch)[0].to(dev)
        iters = max(3, spec["step_images"] // batch)
        reset_peak()
        ref = ReferenceStep(dev, 100, spec["ngf"], spec["ndf"])
        real = images.float().div(127.5).sub(1.0)
        seconds = _time_steps(lambda: ref(real), iters, spec["step_warmup"])
        rows.append(row("step", "reference step: fp32 eager, .item() reads", batch, iters * batch, seconds))
        del ref, real
        for label, precision, overrides in STEP_LADDER:
            fresh_accelerate()
            cfg = config(spec, batch, f"precision={precision}", *overrides)
            accelerator = build_accelerator(cfg)
            gan_step = build_gan(cfg, accelerator)
            notes: list[str] = []
            runner = StepRunner(gan_step, cfg.perf, notes.append)
            seconds = _time_steps(lambda: runner(images), iters, spec["step_warmup"])
            rows.append(row("step", label, batch, iters * batch, seconds, notes=notes))
            del runner, gan_step, accelerator
    return rows


def case_reference(spec: dict) -> list[dict]:
    """(a): the reference-style loop end to end: JPEG loader, fp32 eager step with `.item()` reads."""
    rows, dev = [], device()
    for batch in spec["batches"]:
        for workers in spec["reference_workers"]:
            reset_peak()
            ref = ReferenceStep(dev, 100, spec["ngf"], spec["ndf"])
            loader = iter(reference_loader(Path(spec["jpegs"]), batch, workers))
            n = max(3, spec["reference_steps"] * spec["batches"][0] // batch)
            for _ in range(3):
                ref(next(loader)[0])
            start = time.perf_counter()
            for _ in range(n):
                ref(next(loader)[0])
            rows.append(row("(a) reference", "fp32 eager, JPEG folder decoded every epoch, .item() reads", batch,
                            n * batch, time.perf_counter() - start, workers=workers))
            del loader, ref
    return rows


def _train_quietly(cfg: Config) -> tuple[dict, list[str]]:
    """`train(cfg)` with its console output (and progress bar) kept aside: its last scalars and fast-path lines."""
    fresh_accelerate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        last = train(cfg)
    lines = out.getvalue().splitlines()
    return last, [line for line in lines if "fast path" in line or "resumed from" in line]


TRAINER_KINDS = {  # kind: row name, what, overrides
    "fast": ("(c) trainer fast path", "end to end from shards (bf16)", [*FAST, "diag.enabled=false"]),
    "eager": ("(b) trainer eager", "end to end from shards (bf16)", [*EAGER, "diag.enabled=false"]),
    "fast+diag": ("(c) trainer fast path", "end to end, diagnostics on (eager steps, samples)", FAST),
}


def case_trainer(spec: dict) -> list[dict]:
    """(b) or (c): `train()` end to end from shards; the rate of the second of two equal log intervals."""
    batch, (case, what, overrides) = spec["batch"], TRAINER_KINDS[spec["kind"]]
    window = max(4, spec["window_images"] // batch)
    run_dir = Path(spec["work"]) / f"run-{spec['kind']}-{batch}"
    cfg = config(spec, batch, *overrides, f"run.dir={run_dir}", "run.fresh=true", f"diag.every={spec['diag_every']}",
                 f"data.workers={spec['workers']}", "train.epochs=1000", f"train.max_steps={2 * window}",
                 f"log.every={window}", f"log.images_every={10 * window}", f"ckpt.every={10 * window}")
    last, notes = _train_quietly(cfg)
    rate = last["perf/img_per_s"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return [row(case, what, batch, window * batch, window * batch / rate, workers=spec["workers"], notes=notes)]


CURVE_TAGS = ("loss/D", "loss/G", "D(x)")  # the step statistics each curve keeps, per step


def _curve(spec: dict, seed: int, precision: str, overrides: list[str]) -> dict:
    """Per-step statistics of `curve_steps` steps on the shards, with a diagnostics step (grad norms) now and then."""
    fresh_accelerate()
    batch = spec["curve_batch"]
    cfg = config(spec, batch, f"precision={precision}", f"run.seed={seed}", "data.workers=1", *overrides)
    accelerator = build_accelerator(cfg)
    gan_step = build_gan(cfg, accelerator)
    notes: list[str] = []
    runner = StepRunner(gan_step, cfg.perf, notes.append)
    source = ShardBatchSource(Path(spec["shards"]), cfg.data, batch_size=batch, rank=0, world_size=1, seed=0)
    stats, norms, epoch, every = [], [], 0, max(2, spec["curve_steps"] // 4)
    while len(stats) < spec["curve_steps"]:
        for b in source.batches(epoch):
            diagnose = len(stats) % every == every - 1
            out = runner(b.images, collect_grad_norms=diagnose)
            if diagnose:
                norms.append(out.grad_norms_g["total"].item())
            means = gan_step.stats.take()
            stats.append([float(means[t]) for t in CURVE_TAGS])
            if len(stats) == spec["curve_steps"]:
                break
        epoch += 1
    running = [m for net in (gan_step.G, gan_step.D) for name, m in net.named_buffers() if "running" in name]
    return {"stats": stats, "grad_norm_g": norms, "notes": notes,
            "running_stats": torch.cat([t.flatten().float() for t in running]).cpu()}


def case_curves(spec: dict) -> dict:
    """Loss and D(x) of the fast path against the eager step's on the same seed and batches; another seed
    gives the size of ordinary run-to-run noise."""
    runs = {"bf16 eager, seed 0": _curve(spec, 0, "bf16", EAGER),
            "bf16 fast path, seed 0": _curve(spec, 0, "bf16", FAST),
            "fp32 eager, seed 0": _curve(spec, 0, "no", PLAIN),
            "bf16 eager, seed 1": _curve(spec, 1, "bf16", EAGER)}
    return compare_curves(runs, window=max(5, spec["curve_steps"] // 6))


def compare_curves(runs: dict[str, dict], window: int) -> dict:
    """Windowed means per tag, and each run's largest windowed difference from the first run."""
    names = list(runs)
    tags = CURVE_TAGS
    means = {}
    for name, run in runs.items():
        values = np.asarray(run["stats"], dtype=np.float64)
        usable = values.shape[0] // window * window
        means[name] = values[:usable].reshape(-1, window, len(tags)).mean(axis=1)
    base = names[0]
    first = np.asarray(runs[base]["stats"], dtype=np.float64)
    summary = {}
    for name in names[1:]:
        steps = np.asarray(runs[name]["stats"], dtype=np.float64)
        early = min(10, len(steps))
        bn = runs[name]["running_stats"]
        summary[name] = {
            "max_windowed_abs_diff": dict(zip(tags, np.abs(means[name] - means[base]).max(axis=0).round(4).tolist())),
            "max_abs_diff_first_10_steps": dict(zip(tags, np.abs(steps[:early] - first[:early]).max(axis=0)
                                                    .round(5).tolist())),
            "batchnorm_running_stats_rel_diff": round(float((bn - runs[base]["running_stats"]).norm()
                                                            / runs[base]["running_stats"].norm()), 5),
        }
    return {"baseline": base, "window": window, "tags": list(tags),
            "windowed_means": {k: v.round(4).tolist() for k, v in means.items()},
            "against_baseline": summary,
            "diagnostic_steps_grad_norm_g": {k: [round(x, 4) for x in v["grad_norm_g"]] for k, v in runs.items()},
            "notes": {k: v["notes"] for k, v in runs.items()}}


def case_resume(spec: dict) -> dict:
    """Fast path with diagnostics: K steps, checkpoint, a new `train()` resumes for K more; against 2K uninterrupted."""
    from safetensors.torch import load_file

    from dcgan_dist.checkpoint import GENERATOR_EXPORT

    k, batch = spec["resume_steps"], spec["curve_batch"]
    common = ["data.workers=1", f"log.every={k}", f"log.images_every={10 * k}", f"ckpt.every={k}",
              f"diag.every={spec['diag_every']}"]  # diagnostics steps (eager) between the replays, on both sides
    whole, split = Path(spec["work"]) / "resume-whole", Path(spec["work"]) / "resume-split"
    last_whole, _ = _train_quietly(config(spec, batch, *common, f"run.dir={whole}", "run.fresh=true",
                                          f"train.max_steps={2 * k}"))
    _train_quietly(config(spec, batch, *common, f"run.dir={split}", "run.fresh=true", f"train.max_steps={k}"))
    last_split, notes = _train_quietly(config(spec, batch, *common, f"run.dir={split}", f"train.max_steps={2 * k}"))
    a, b = load_file(str(whole / GENERATOR_EXPORT)), load_file(str(split / GENERATOR_EXPORT))
    diff = math.sqrt(sum(float((a[n].float() - b[n].float()).pow(2).sum()) for n in a))
    norm = math.sqrt(sum(float(a[n].float().pow(2).sum()) for n in a))
    return {"steps": 2 * k, "batch": batch, "notes": notes,
            "generator_rel_diff_resumed_vs_uninterrupted": round(diff / norm, 6),
            "last_scalars": {"uninterrupted": {t: round(last_whole[t], 5) for t in ("loss/D", "loss/G", "D(x)")},
                             "resumed": {t: round(last_split[t], 5) for t in ("loss/D", "loss/G", "D(x)")}}}


CASES: dict[str, Callable[[dict], object]] = {"loaders": case_loaders, "step": case_step, "reference": case_reference,
                                              "trainer": case_trainer, "curves": case_curves, "resume": case_resume}


# ------------------------------------------------------------------------------------------ scaling model

# H100 figures measured by the reference's speed-of-light probe (quoted in docs/performance.md), ms per
# step: bf16 + channels_last + fused Adam + G-only backward, eager, and the same in one CUDA graph.
REFERENCE_H100_STEP_MS = {128: {"eager": 128 / 13_121 * 1e3, "graph": 128 / 44_845 * 1e3},
                          1024: {"eager": 1024 / 79_522 * 1e3, "graph": 1024 / 80_617 * 1e3}}
# Interconnects: all-reduce bus bandwidth NCCL reaches on messages of a few MB, latency per all-reduce, and the
# GPU counts they serve (an HGX H100 node's NVLink joins 8 GPUs; 64 GPUs are 8 nodes, bound by InfiniBand).
# Assumptions to be replaced by nccl-tests figures measured on the machines at hand.
LINKS = {"NVLink (H100 SXM, NVSwitch)": {"bus_gb_s": 150.0, "latency_us": 20.0, "gpus": [2, 8]},
         "InfiniBand NDR 400 Gb/s per GPU": {"bus_gb_s": 25.0, "latency_us": 40.0, "gpus": [2, 8, 64]}}
BACKWARD_SHARE = {"D": 0.3, "G": 0.4}  # the share of a step's GPU time each backward (D step, G step) takes


def gradient_buckets(model: torch.nn.Module, cap_mb: float) -> list[int]:
    """Bytes of each DDP bucket of `model`'s fp32 gradients, in the order the backward fills them (DDP's own rule)."""
    params = list(reversed(list(model.parameters())))
    limits = [dist._DEFAULT_FIRST_BUCKET_BYTES, int(cap_mb * 2**20)]
    buckets, _ = dist._compute_bucket_assignment_by_size(params, limits, [False] * len(params), list(range(len(params))))
    return [sum(params[i].numel() * 4 for i in bucket) for bucket in buckets]


def allreduce_ms(nbytes: int, gpus: int, link: dict) -> float:
    """Ring all-reduce: every GPU sends and receives 2 (n - 1) / n of the message, plus a fixed latency."""
    return link["latency_us"] / 1e3 + 2 * (gpus - 1) / gpus * nbytes / (link["bus_gb_s"] * 1e9) * 1e3


def scaling_model(step_ms: dict[int, dict[str, float]], cap_mb: float, ngf: int = 64, ndf: int = 64) -> dict:
    """Predicted DDP efficiency at 2, 8 and 64 GPUs (docs/performance.md explains the model).

    Per backward, the buckets' all-reduces run one after another from the moment the first bucket is ready;
    the backward hides them up to its own length, except the last bucket, which is ready only at its end.
    A multi-GPU step runs eagerly, so the host needs `eager` ms to launch it and the GPU `graph` ms of work
    plus the exposed communication: the step takes the longer of the two. The last column is what a
    captured DDP step (not built) would reach.
    """
    buckets = {"G": gradient_buckets(Generator(100, ngf), cap_mb), "D": gradient_buckets(Discriminator(ndf), cap_mb)}
    out = {"bucket_cap_mb": cap_mb, "bucket_mb": {k: [round(b / 1e6, 2) for b in v] for k, v in buckets.items()},
           "links": LINKS, "backward_share": BACKWARD_SHARE, "predictions": []}
    for batch, times in sorted(step_ms.items()):
        for name, link in LINKS.items():
            for gpus in link["gpus"]:
                exposed = 0.0
                for net, sizes in buckets.items():
                    comm = [allreduce_ms(b, gpus, link) for b in sizes]
                    hidden = BACKWARD_SHARE[net] * times["graph"]
                    exposed += max(comm[-1], sum(comm) - hidden)
                step = max(times["eager"], times["graph"] + exposed)
                out["predictions"].append({
                    "batch_per_gpu": batch, "link": name, "gpus": gpus, "exposed_comm_ms": round(exposed, 3),
                    "step_ms": round(step, 3), "img_per_s": round(gpus * batch / step * 1e3),
                    "efficiency_vs_1gpu_eager": round(times["eager"] / step, 3),
                    "efficiency_vs_1gpu_fast_path": round(times["graph"] / step, 3),
                    "efficiency_if_ddp_steps_were_captured": round(times["graph"] / (times["graph"] + exposed), 3)})
    return out


# ------------------------------------------------------------------------------------------ the run


def machine_info() -> dict:
    info = {"hostname": platform.node(), "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        info["cpu"] = names[0] if names else info["cpu"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count, gpus=torch.cuda.device_count())
    return info


def versions() -> dict:
    import accelerate
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
            "webdataset": getattr(webdataset, "__version__", "?"), "numpy": np.__version__}


def machine_slug(info: dict) -> str:
    name = info.get("gpu") or f"cpu-{info['cpus']}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_case(name: str, spec: dict, isolate: bool, timeout: float) -> tuple[object, str | None]:
    """A case's result, in this process or in a child (`--case`); (None, the reason) when it failed."""
    if not isolate:
        try:
            return CASES[name](spec), None
        except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others' figures
            return None, f"{type(exc).__name__}: {exc}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--spec", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        return None, f"exit {proc.returncode}: {tail}"
    return json.loads(result[-1][len("RESULT "):]), None


def print_table(rows: list[dict]) -> None:
    print(f"\n{'case':<24} {'what':<58} {'batch':>5} {'workers':>7} {'img/s':>10} {'ms/step':>9} {'peak MiB':>9}")
    for r in rows:
        workers = "" if r.get("workers") is None else r["workers"]
        peak = "" if r.get("peak_gpu_mib") is None else r["peak_gpu_mib"]
        print(f"{r['case']:<24} {r['label'][:58]:<58} {r['batch']:>5} {workers:>7} {r['img_per_s']:>10,.0f} "
              f"{r['ms_per_step']:>9.2f} {peak:>9}")


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def step_times_for_model(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Measured eager and graph step times (bf16, channels_last) per batch, for the scaling model."""
    found: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["case"] == "step" and r["label"] == STEP_LADDER[1][0]:
            found.setdefault(r["batch"], {})["eager"] = r["ms_per_step"]
        if r["case"] == "step" and r["label"] == STEP_LADDER[2][0]:
            found.setdefault(r["batch"], {})["graph"] = r["ms_per_step"]
    return {b: t for b, t in found.items() if len(t) == 2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes (the default without a GPU)")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<date>-<machine>.json)")
    parser.add_argument("--workdir", type=Path, help="keep the synthetic JPEGs and shards here (default: a temp dir)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="each case in its own process (auto: with a GPU)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # a child: one case, its result as the last line
        spec = json.loads(args.spec)
        torch.set_num_threads(spec["cpu_threads"] or torch.get_num_threads())
        print("RESULT " + json.dumps(CASES[args.case](spec)), flush=True)
        return 0

    started = time.perf_counter()
    gpu = torch.cuda.is_available()
    sizes = SMALL if args.small or not gpu else FULL
    isolate = args.isolate == "yes" or (args.isolate == "auto" and gpu)
    # Without a GPU, one thread: a small CPU run tests the harness, and OpenMP threads spinning against
    # other processes on a busy machine can make a step ten times slower than it is.
    cpu_threads = None if gpu else 1
    torch.set_num_threads(cpu_threads or torch.get_num_threads())
    info = machine_info()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or RESULTS / f"{date}-{machine_slug(info)}.json"
    report = {"date": date, "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": info,
              "versions": versions(), "mode": "small" if sizes is SMALL else "full", "sizes": asdict(sizes),
              "rows": [], "curves": None, "resume": None, "skipped": [], "errors": []}
    print(f"# train_throughput: {report['mode']} sizes on {info.get('gpu') or info['cpu']} ({info['cpus']} CPUs), "
          f"torch {torch.__version__}; writing {out}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dcgan-train-throughput-") as tmp:
        work = args.workdir or Path(tmp)
        t = time.perf_counter()
        celeba = work / "celeba"
        if not (celeba / "synth.json").is_file():
            write_synthetic_celeba(celeba, sizes.images, modes=10, seed=0)
        shards = work / "shards"
        if not (shards / "manifest.json").is_file():
            build_shards(celeba, shards, fmt="raw", shard_size=sizes.shard_size, fast_decode=True)
        report["data_seconds"] = round(time.perf_counter() - t, 1)
        spec = {"jpegs": str(celeba / "img_align_celeba"), "shards": str(shards), "work": str(work),
                "cpu_threads": cpu_threads,
                **{k: v for k, v in asdict(sizes).items() if k not in ("images", "shard_size", "budget_s")}}
        print(f"# data: {sizes.images} JPEGs and their npy shards in {report['data_seconds']}s", flush=True)

        def attempt(name: str, what: str, **extra) -> object:
            left = sizes.budget_s - (time.perf_counter() - started)
            if left <= 0:
                report["skipped"].append(what)
                print(f"# skipped (time budget spent): {what}", flush=True)
                return None
            t0 = time.perf_counter()
            result, error = run_case(name, {**spec, **extra}, isolate, left)
            print(f"# {what}: {'done' if error is None else 'FAILED'} in {time.perf_counter() - t0:.1f}s", flush=True)
            if error is not None:
                report["errors"].append({"case": what, "error": error})
                print(error, flush=True)
            return result

        report["rows"] += attempt("step", "step alone") or []
        # the correctness checks early: if the time budget runs out, figures are what is skipped
        report["curves"] = attempt("curves", "curves: fast path against eager")
        report["resume"] = attempt("resume", "resume with the fast path")
        write_json(out, report)
        report["rows"] += attempt("loaders", "loaders alone") or []
        for batch in sizes.batches:  # the trainer reads with the worker count the loader did best with
            loads = [r for r in report["rows"] if r["case"] == "loader" and r["batch"] == batch
                     and r["label"].startswith("shards")]
            workers = max(loads, key=lambda r: r["img_per_s"])["workers"] if loads else sizes.loader_workers[-1]
            for kind in TRAINER_KINDS:
                report["rows"] += attempt("trainer", f"trainer {kind}, batch {batch}", batch=batch, kind=kind,
                                          workers=workers) or []
                write_json(out, report)
        report["rows"] += attempt("reference", "reference end to end") or []

    times = step_times_for_model(report["rows"]) if gpu else {}
    source = "this run's step-alone rows" if times else "the reference's H100 probe (H100-baselines.md)"
    report["scaling_model"] = {"step_times_from": source,
                               **scaling_model(times or REFERENCE_H100_STEP_MS, load_config().perf.ddp_bucket_cap_mb)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out, report)
    print_table(report["rows"])
    if report["curves"]:
        print("\ncurves against", report["curves"]["baseline"], "(max windowed |diff|):")
        for name, s in report["curves"]["against_baseline"].items():
            print(f"  {name:<24} {s['max_windowed_abs_diff']}  first 10 steps {s['max_abs_diff_first_10_steps']}")
    if report["resume"]:
        print(f"\nresume: generator rel. diff resumed vs uninterrupted "
              f"{report['resume']['generator_rel_diff_resumed_vs_uninterrupted']}")
    print(f"\n{len(report['rows'])} rows, {len(report['errors'])} errors, {len(report['skipped'])} skipped, "
          f"{report['seconds']}s; {out}", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
