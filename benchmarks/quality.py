"""Sample quality side by side: this trainer (G and its moving average) against the reference recipe.

The reference recipe is the pytorch/examples DCGAN loop (dcgan/main.py), written out below: JPEGs
through torchvision's ImageFolder with Resize(64) + CenterCrop(64) + ToTensor + Normalize(0.5, 0.5)
every epoch, D ending in a Sigmoid with BCELoss, fp32, Adam(lr 2e-4, betas (0.5, 0.999)) for both,
the lab's architecture and initialisation. This trainer runs with its defaults (the lab's loss from
logits, shards built once from the same JPEGs, its moving average of G) for the same number of steps
at the same batch size. Both train on the same images; a held-out set of real images that neither
saw is the reference of FID and KID, for the reference's G, our G and our G's average, over seeds.

    # on a CPU: 10,000 faces, 1,000 held out, width 32, 500 steps of 64, 500 samples per model
    python benchmarks/quality.py --images /data/celeba-half-10k
    # on a GPU: full width and batch, longer
    python benchmarks/quality.py --images /data/celeba-half-10k --ngf 64 --ndf 64 --batch 128 \
        --steps 5000 --samples 5000 --workers 8
    # the harness on synthetic faces in about a minute (with the standard FID network: minutes on a CPU)
    python benchmarks/quality.py --small
    # ours in fp32 and in bf16 side by side, with the diagnostics' diversity and alarms, one thread each
    python benchmarks/quality.py --images /data/celeba-half-10k --precisions no bf16 --diag-every 50 --threads 1

Every generator is sampled the same way (the same latents, BatchNorm batch statistics in batches of
64, as dcgan-eval does). FID is biased upward at small sample counts (at 500 samples by tens of
points), so compare FIDs only within one table; KID is unbiased at any count. The JSON (settings,
machine, versions, every run's numbers and times, means over seeds) goes to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a plain checkout too (no `pip install -e .` needed)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dcgan_dist.checkpoint import GENERATOR_EXPORT, RAW_GENERATOR_EXPORT, load_generator  # noqa: E402
from dcgan_dist.config import load_config  # noqa: E402
from dcgan_dist.data.images import list_images  # noqa: E402
from dcgan_dist.data.build.pack import build_shards  # noqa: E402
from dcgan_dist.data.build.synth import write_synthetic_celeba  # noqa: E402
from dcgan_dist.fileio import atomic_write  # noqa: E402
from dcgan_dist.models import Discriminator, Generator  # noqa: E402
from dcgan_dist.quality import distances  # noqa: E402
from dcgan_dist.quality.generator import generate, latents  # noqa: E402
from dcgan_dist.quality.inception import FeatureExtractor  # noqa: E402
from dcgan_dist.quality.reference import reference_stats  # noqa: E402
from dcgan_dist.train import train  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# the reference recipe's hyperparameters (pytorch/examples dcgan/main.py defaults)
REFERENCE_LR, REFERENCE_BETAS, NZ = 2e-4, (0.5, 0.999), 100
SAMPLE_SEED = 0  # the latents every model is sampled with
FULL = {"holdout": 1000, "steps": 500, "batch": 64, "ngf": 32, "ndf": 32, "samples": 500, "seeds": [0, 1]}
SMALL = {"holdout": 16, "steps": 12, "batch": 16, "ngf": 8, "ndf": 8, "samples": 16, "seeds": [0, 1], "images": 96}


def split_images(images: list[Path], holdout: int, work: Path) -> tuple[Path, Path]:
    """Folders of symbolic links: `train/faces/` (ImageFolder's class folder) and `test/`, `holdout` images
    chosen at random (seed 0); the images themselves are never copied."""
    if len(images) <= holdout + 1:
        raise SystemExit(f"quality: {len(images)} images, expected more than --holdout {holdout}")
    chosen = set(np.random.default_rng(0).permutation(len(images))[:holdout].tolist())
    train_dir, test_dir = work / "train" / "faces", work / "test"
    for folder in (train_dir, test_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(images):
        link = (test_dir if i in chosen else train_dir) / f"{i:06d}{path.suffix.lower()}"
        if not link.is_symlink():
            link.symlink_to(path.resolve())
    return train_dir.parent, test_dir


def shards_of(folder: Path, out: Path) -> Path:
    """All of `folder` as the split "train" of a shard folder (valid_fraction 0), built once."""
    if not (out / "manifest.json").is_file():
        build_shards(folder, out, fmt="raw", valid_fraction=0.0, workers=1)
    return out


def train_reference(train_root: Path, steps: int, batch: int, ngf: int, ndf: int, workers: int, seed: int,
                    device: torch.device) -> nn.Module:
    """pytorch/examples dcgan/main.py's loop for `steps` iterations; returns its G (train mode, as main.py samples)."""
    import torchvision.datasets as dset
    import torchvision.transforms as transforms

    torch.manual_seed(seed)
    dataset = dset.ImageFolder(root=str(train_root), transform=transforms.Compose([
        transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]))
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    netG = Generator(NZ, ngf).to(device)  # the lab's layers and weights_init (dcgan_dist.models)
    netD = nn.Sequential(Discriminator(ndf), nn.Sigmoid()).to(device)  # main.py's D ends in a Sigmoid
    criterion = nn.BCELoss()
    real_label, fake_label = 1.0, 0.0
    optimizerD = torch.optim.Adam(netD.parameters(), lr=REFERENCE_LR, betas=REFERENCE_BETAS)
    optimizerG = torch.optim.Adam(netG.parameters(), lr=REFERENCE_LR, betas=REFERENCE_BETAS)
    done = 0
    while done < steps:
        for data in dataloader:
            netD.zero_grad()
            real_cpu = data[0].to(device)
            batch_size = real_cpu.size(0)
            label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=device)
            output = netD(real_cpu)
            errD_real = criterion(output, label)
            errD_real.backward()
            noise = torch.randn(batch_size, NZ, 1, 1, device=device)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach())
            errD_fake = criterion(output, label)
            errD_fake.backward()
            optimizerD.step()
            netG.zero_grad()
            label.fill_(real_label)
            output = netD(fake)
            errG = criterion(output, label)
            errG.backward()
            optimizerG.step()
            done += 1
            if done == steps:
                break
    return netG


def ours_label(precision: str, precisions: list[str]) -> str:
    """Our row's name in the table: "ours" when there is one precision, else "ours fp32", "ours bf16", ..."""
    return "ours" if len(precisions) == 1 else f"ours {'fp32' if precision == 'no' else precision}"


def train_ours(shards: Path, run_dir: Path, steps: int, batch: int, ngf: int, ndf: int, workers: int, seed: int,
               precision: str, threads: int | None, diag_every: int) -> tuple[nn.Module, nn.Module, dict]:
    """dcgan-train with its defaults (but `precision`, `perf.cpu_threads` and the diagnostics) for `steps` steps:
    its G and its moving average from the run's exports, and what the run says of itself (the precision it
    resolved to; with diagnostics, the last diversity ratio and the alarms that fired)."""
    from accelerate.state import AcceleratorState

    from dcgan_dist.report import load_run

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator for every run in this process
    diag = [f"diag.every={diag_every}"] if diag_every else ["diag.enabled=false"]
    cfg = load_config(None, [f"data.source={shards}", f"run.dir={run_dir}", "run.fresh=true", f"run.seed={seed}",
                             f"train.batch_size={batch}", f"train.max_steps={steps}", "train.epochs=1000",
                             f"model.ngf={ngf}", f"model.ndf={ndf}", f"data.workers={workers}", f"precision={precision}",
                             f"perf.cpu_threads={threads or 'auto'}", *diag,
                             f"ckpt.every={steps}", "ckpt.keep=1", f"log.every={steps}"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(cfg)
    facts = {"precision": cfg.precision}
    if diag_every:
        run = load_run(run_dir)
        facts.update(diversity_ratio=run.final("diversity/ratio"), alarms=sorted({a["alarm"] for a in run.alarms}))
    return load_generator(run_dir / RAW_GENERATOR_EXPORT), load_generator(run_dir / GENERATOR_EXPORT), facts


def measure(G: nn.Module, samples: int, extractor: FeatureExtractor, real, device: torch.device) -> dict:
    """FID and KID of `samples` images of G against the held-out statistics `real`."""
    G.to(device)
    fake = extractor.features(generate(G, latents(samples, NZ, SAMPLE_SEED), "batch"))
    mu, sigma = distances.feature_stats(fake)
    kid_mean, kid_std = distances.kid(real.features, fake, seed=SAMPLE_SEED, device=device)
    return {"fid": distances.fid_from_stats(real.mu, real.sigma, mu, sigma), "kid": kid_mean, "kid_std": kid_std}


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        info["cpu"] = names[0] if names else info["cpu"]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_properties(0).name
    return info


def summarise(runs: list[dict]) -> dict:
    """Mean and spread over seeds, per model (in the order of the runs)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        rows = [r for r in runs if r["model"] == model]
        if rows:
            out[model] = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
                          for k in ("fid", "kid", "train_seconds")}
    return out


def diagnosed(row: dict) -> str:
    """A run's diagnostics in a table cell: its last diversity ratio and its alarms (with --diag-every)."""
    if "alarms" not in row:
        return ""
    ratio = "-" if row["diversity_ratio"] is None else f"{row['diversity_ratio']:.2f}"
    return f" (diversity {ratio}, alarms: {', '.join(row['alarms']) or 'none'})"


def table(report: dict) -> str:
    """The Markdown table of docs/quality.md."""
    s = report["settings"]
    lines = [f"| model | FID ({s['samples']:,} vs {s['holdout']:,}; biased at this N) | KID x 1000 (unbiased) "
             "| per seed: FID / KID x 1000 | train s (mean) |", "|---|---|---|---|---|"]
    for model, summary in report["summary"].items():
        per_seed = "; ".join(f"seed {r['seed']}: {r['fid']:.1f} / {r['kid'] * 1000:.1f}" + diagnosed(r)
                             for r in report["runs"] if r["model"] == model)
        lines.append(f"| {model} | {summary['fid']['mean']:.1f} +- {summary['fid']['std']:.1f} | "
                     f"{summary['kid']['mean'] * 1000:.1f} +- {summary['kid']['std'] * 1000:.1f} | {per_seed} | "
                     f"{summary['train_seconds']['mean']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="a folder of face JPEGs (e.g. /data/celeba-half-10k)")
    parser.add_argument("--small", action="store_true", help="synthetic faces and tiny sizes: tests the harness")
    for key, value in FULL.items():
        if key != "seeds":
            parser.add_argument(f"--{key}", type=int, default=None, help=f"default {value} ({SMALL[key]} with --small)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of both (main.py's default: 2)")
    parser.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "no", "bf16", "fp16"],
                        help="our trainer once per precision (default: auto; the reference is always fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of both (default: torch's choice)")
    parser.add_argument("--diag-every", type=int, default=0,
                        help="our runs with diagnostics every N steps: the last diversity ratio and alarms per run")
    parser.add_argument("--inception", type=Path, default=None, help="another TorchScript FID network (tests)")
    parser.add_argument("--workdir", type=Path, help="keep links, shards and runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/quality-<date>-<machine>.json)")
    args = parser.parse_args(argv)
    if (args.images is None) == (not args.small):
        parser.error("give --images DIR or --small")
    sizes = {**(SMALL if args.small else FULL)}
    sizes.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    slug = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or f"cpu-{info['cpus']}core").lower()).strip("-")
    out = args.out or RESULTS / f"quality-{date}-{'small-' if args.small else ''}{slug}.json"
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"# quality [{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dcgan-quality-") as tmp:
        work = args.workdir or Path(tmp)
        if args.small:
            source = work / "synthetic"
            if not (source / "synth.json").is_file():
                write_synthetic_celeba(source, sizes["images"], modes=4, seed=0)
            images = list_images(source / "img_align_celeba")
        else:
            images = list_images(args.images)
        train_root, test_dir = split_images(images, sizes["holdout"], work)
        shards, test_shards = shards_of(train_root / "faces", work / "shards"), shards_of(test_dir, work / "test-shards")
        log(f"{len(images) - sizes['holdout']:,} training images, {sizes['holdout']:,} held out; shards built")
        extractor = FeatureExtractor(args.inception, device=device)
        real = reference_stats(test_shards, "train", None, extractor, log=log)
        settings = {**{k: v for k, v in sizes.items() if k != "images"}, "images": len(images), "nz": NZ,
                    "workers": args.workers, "threads": torch.get_num_threads(), "precisions": args.precisions,
                    "diag_every": args.diag_every, "sample_seed": SAMPLE_SEED, "bn": "batch", "device": str(device),
                    "network": extractor.describe(), "reference_lr": REFERENCE_LR,
                    "reference_betas": list(REFERENCE_BETAS), "source": "synthetic" if args.small else "--images"}
        report = {"date": date, "command": " ".join(["python", "benchmarks/quality.py", *(argv or sys.argv[1:])]),
                  "machine": info, "versions": {"torch": torch.__version__, "python": platform.python_version()},
                  "settings": settings, "runs": []}
        for seed in sizes["seeds"]:
            t = time.perf_counter()
            models = {"reference": train_reference(train_root, sizes["steps"], sizes["batch"], sizes["ngf"],
                                                   sizes["ndf"], args.workers, seed, device)}
            seconds, facts = {"reference": time.perf_counter() - t}, {"reference": {"precision": "no"}}
            for precision in args.precisions:
                ours = ours_label(precision, args.precisions)
                ours_ema = f"{ours} EMA"
                run_dir = work / (f"run-{seed}" if len(args.precisions) == 1 else f"run-{precision}-{seed}")
                t = time.perf_counter()
                models[ours], models[ours_ema], facts[ours] = train_ours(
                    shards, run_dir, sizes["steps"], sizes["batch"], sizes["ngf"], sizes["ndf"], args.workers, seed,
                    precision, args.threads, args.diag_every)
                seconds[ours] = seconds[ours_ema] = time.perf_counter() - t
                facts[ours_ema] = facts[ours]
            log(f"seed {seed}: trained (" + ", ".join(f"{m} {s:.0f}s" for m, s in seconds.items()
                                                      if not m.endswith("EMA")) + ")")
            for model in models:
                t = time.perf_counter()
                row = {"model": model, "seed": seed, **measure(models[model], sizes["samples"], extractor, real, device),
                       **facts[model], "train_seconds": round(seconds[model], 1),
                       "eval_seconds": round(time.perf_counter() - t, 1)}
                report["runs"].append(row)
                log(f"seed {seed} {model}: FID {row['fid']:.2f}, KID x 1000 {row['kid'] * 1000:.2f}")
            report["summary"] = summarise(report["runs"])
            report["seconds"] = round(time.perf_counter() - started, 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, json.dumps(report, indent=1) + "\n")  # after every seed: a long run keeps what it has
    print(table(report))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
