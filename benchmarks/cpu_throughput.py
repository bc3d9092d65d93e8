"""Training throughput on a CPU: this trainer (fp32 eager, and its CPU fast path) against the reference recipe.

Four cases, each run in its own process, interleaved round by round (reference, fp32, fast, bf16, reference, ...)
so that a busy machine slows all of them alike; the load average is recorded next to every figure:
  reference  the pytorch/examples DCGAN recipe: torchvision ImageFolder over the JPEG folder with
             Resize(64) + CenterCrop(64) + ToTensor + Normalize(0.5), a shuffled DataLoader with 2 workers,
             fp32, Sigmoid + BCELoss, Adam 2e-4 (0.5, 0.999), five `.item()` reads per step
             (`ReferenceStep` of train_throughput.py); torch's default threads;
  fp32       `dcgan-train` from raw shards of the same JPEGs: precision no, contiguous layout;
  fast       `dcgan-train` with its defaults: `precision: auto` (bf16 where it pays: AMX-BF16), channels_last,
             `perf.cpu_threads: auto`;
  bf16       `dcgan-train` with `precision=bf16` and channels_last, whatever the CPU (the rule's evidence).
Both trainer cases run with diagnostics off and report the rate of the second of two equal log intervals;
the reference is timed over its steps after three untimed ones, loading included.

    python benchmarks/cpu_throughput.py --data /data/celeba-jpegs         # widths 32 and 64, batch 64
    python benchmarks/cpu_throughput.py --small                           # synthetic JPEGs, tiny, one thread
    python benchmarks/cpu_throughput.py --data /data/celeba-jpegs --sweep # threads x loader workers x shard format

--sweep runs the fast case alone at the first width for every torch thread count from 1 to the cores, every
`data.workers` in 0, 1, 2, from png shards (the default format: decoded in the loader's workers, or in the
training process with 0 workers) and from raw ones (no decoding): the measurements behind `perf.cpu_threads:
auto` and the presets' `data.workers`.

Shards are built with `dcgan-shards build --format raw` (into --workdir, kept for the next run). The JSON
goes to benchmarks/results/<date>-cpu-<machine>.json: every run, the medians per case and width, the ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # train_throughput.py: the reference step, machine and version records
sys.path.insert(0, str(HERE.parent))  # runs from a plain checkout too

import torch  # noqa: E402
import train_throughput as tt  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from dcgan_dist.config import load_config  # noqa: E402
from dcgan_dist.cpu import probe_cpu_bf16, usable_cores  # noqa: E402
from dcgan_dist.train import train  # noqa: E402

CASES = ("reference", "fp32", "fast", "bf16")
TRAINER_CASES = CASES[1:]
TRAINER_OVERRIDES = {"fp32": ["precision=no", "perf.channels_last=false"], "fast": [], "bf16": ["precision=bf16"]}


@dataclass(frozen=True)
class Sizes:
    widths: tuple[int, ...]  # ngf = ndf
    batch: int
    steps: int  # timed reference steps, and the trainer's log interval (two of them run)
    rounds: int
    synthetic_images: int  # --small: synthetic JPEGs written first


FULL = Sizes(widths=(32, 64), batch=64, steps=24, rounds=3, synthetic_images=0)
SMALL = Sizes(widths=(8,), batch=16, steps=4, rounds=2, synthetic_images=256)


def reference_loader(root: Path, batch: int) -> DataLoader:
    """pytorch/examples dcgan/main.py's loader for a folder of JPEGs (its `--dataset folder`), 2 workers."""
    dataset = datasets.ImageFolder(root=str(root), transform=transforms.Compose([
        transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]))
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=2)


def run_reference(spec: dict) -> dict:
    """The reference loop: three untimed steps, then `steps` timed ones, loading included."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    step = tt.ReferenceStep(torch.device("cpu"), 100, spec["width"], spec["width"])
    batches = iter(reference_loader(Path(spec["folder"]), spec["batch"]))
    for _ in range(3):
        step(next(batches)[0])
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step(next(batches)[0])
    seconds = time.perf_counter() - start
    return {"img_per_s": spec["steps"] * spec["batch"] / seconds, "threads": torch.get_num_threads(), "workers": 2}


def run_trainer(spec: dict) -> dict:
    """`train()` from the shards: two log intervals of `steps` steps; the second one's rate."""
    k = spec["steps"]
    run_dir = Path(spec["work"]) / f"run-{spec['case']}-{spec['width']}"
    cfg = load_config(None, [f"data.source={spec['shards']}", f"run.dir={run_dir}", "run.fresh=true",
                             f"model.ngf={spec['width']}", f"model.ndf={spec['width']}",
                             f"train.batch_size={spec['batch']}", "train.epochs=1000", f"train.max_steps={2 * k}",
                             f"log.every={k}", f"log.images_every={100 * k}", f"ckpt.every={100 * k}",
                             "diag.enabled=false", f"perf.cpu_threads={spec['threads'] or 'auto'}",
                             *([f"data.workers={spec['workers']}"] if spec.get("workers") is not None else []),
                             *TRAINER_OVERRIDES[spec["case"]]])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        last = train(cfg)
    shutil.rmtree(run_dir, ignore_errors=True)
    cpu_line = next((line for line in out.getvalue().splitlines() if "[dcgan-train] CPU:" in line), "")
    return {"img_per_s": last["perf/img_per_s"], "threads": torch.get_num_threads(), "workers": cfg.data.workers,
            "precision": cfg.precision, "cpu_line": cpu_line}


def run_case(case: str, spec: dict, timeout: float) -> dict:
    """One case in a child process, its result with the load average before and after."""
    before = os.getloadavg()[0]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--spec", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: " + " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])}
    return {**json.loads(lines[-1][len("RESULT "):]), "load1_before": round(before, 2),
            "load1_after": round(os.getloadavg()[0], 2)}


def prepare_data(args: argparse.Namespace, sizes: Sizes, work: Path) -> tuple[Path, dict[str, Path]]:
    """(ImageFolder root, {format: shard folder}): synthetic JPEGs with --small; raw shards (png too for
    --sweep) built once with `dcgan-shards`."""
    shards_cli = shutil.which("dcgan-shards", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if shards_cli is None:
        sys.exit("cpu_throughput: the dcgan-shards command is missing; install the project (pip install -e .)")
    if args.small:
        source = work / "synthetic"
        if not source.is_dir():
            subprocess.run([shards_cli, "synth", "--out", str(source), "--count", str(sizes.synthetic_images)],
                           check=True, capture_output=True)
        jpegs = source / "img_align_celeba"
    else:
        source = jpegs = args.data.resolve()
    shards = {"raw": work / "shards", **({"png": work / "shards-png"} if args.sweep else {})}
    for fmt, folder in shards.items():
        if not (folder / "manifest.json").is_file():
            subprocess.run([shards_cli, "build", "--source", str(source), "--out", str(folder), "--format", fmt],
                           check=True, capture_output=True)
    folder = work / "imagefolder"  # ImageFolder wants class folders: one, linking to the JPEGs
    if not (folder / "faces").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "faces").symlink_to(jpegs, target_is_directory=True)
    return folder, shards


def summarise(runs: list[dict], widths: tuple[int, ...]) -> list[dict]:
    """Per width: the median img/s of each case and the trainer's ratios to the reference."""
    table = []
    for width in widths:
        medians = {}
        for case in CASES:
            rates = [r["img_per_s"] for r in runs if r["case"] == case and r["width"] == width and "img_per_s" in r]
            medians[case] = round(statistics.median(rates), 1) if rates else None
        ref = medians["reference"]
        ratios = {f"{case}_vs_reference": round(medians[case] / ref, 2) if ref and medians[case] else None
                  for case in TRAINER_CASES}
        table.append({"width": width, "median_img_per_s": medians, **ratios})
    return table


def round_specs(sweep: bool, sizes: Sizes, threads: int | None, folder: Path, shards: dict[str, Path],
                work: Path) -> list[tuple[str, dict]]:
    """One round's (case, spec) in order: every case at every width, or with `sweep` the fast case at the first
    width for every shard format, thread count (1 to the cores, or `threads`) and loader worker count (0, 1, 2)."""
    common = {"batch": sizes.batch, "steps": sizes.steps, "folder": str(folder), "work": str(work)}
    if not sweep:
        return [(case, {**common, "width": width, "threads": threads, "shards": str(shards["raw"])})
                for width in sizes.widths for case in CASES]
    return [("fast", {**common, "width": sizes.widths[0], "threads": t, "workers": w, "format": fmt,
                      "shards": str(shards[fmt])})
            for fmt in shards for t in ([threads] if threads else range(1, usable_cores() + 1)) for w in (0, 1, 2)]


def sweep_summary(runs: list[dict]) -> list[dict]:
    """The median img/s of every (format, threads, workers) of a sweep, fastest first."""
    keys = dict.fromkeys((r["format"], r["threads"], r["workers"]) for r in runs if "img_per_s" in r)
    table = [{"format": f, "threads": t, "workers": w, "median_img_per_s": round(statistics.median(
        r["img_per_s"] for r in runs if (r.get("format"), r.get("threads"), r.get("workers")) == (f, t, w)), 1)}
        for f, t, w in keys]
    return sorted(table, key=lambda row: -row["median_img_per_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a folder of face JPEGs (CelebA's or similar) for both loaders")
    parser.add_argument("--small", action="store_true", help="synthetic JPEGs, tiny models: tests the harness")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 3, small: 2)")
    parser.add_argument("--threads", type=int, help="torch threads in every case (default: each case's own "
                        "choice, torch's default and perf.cpu_threads auto; small: 1)")
    parser.add_argument("--sweep", action="store_true", help="threads x loader workers x shard format, fast case only")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<date>-cpu-<machine>.json)")
    parser.add_argument("--workdir", type=Path, help="keep shards here between runs (default: a temp dir)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # a child: one case, its result as the last line
        spec = json.loads(args.spec)
        result = run_reference(spec) if args.case == "reference" else run_trainer({**spec, "case": args.case})
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if not args.small and args.data is None:
        parser.error("--data FOLDER is needed (or --small)")

    sizes = SMALL if args.small else FULL
    rounds = args.rounds or sizes.rounds
    # small: one thread, since two OpenMP threads against other work on a busy 2-core machine can be 100x slower
    threads = args.threads or (1 if args.small else None)
    info = {**tt.machine_info(), "cpu_bf16": asdict(probe_cpu_bf16()),
            "torch_default_threads": torch.get_num_threads()}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or tt.RESULTS / f"{date}-cpu-{tt.machine_slug(info)}.json"
    report = {"date": date, "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": info,
              "versions": tt.versions(), "mode": "small" if args.small else "full", "sizes": asdict(sizes),
              "rounds": rounds, "threads": threads, "runs": [], "errors": []}
    print(f"# cpu_throughput: {report['mode']} on {info['cpu']} ({info['cpus']} CPUs, bf16 pays: "
          f"{info['cpu_bf16']['pays']}), load {info['load_average_at_start']}; writing {out}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dcgan-cpu-throughput-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        folder, shards = prepare_data(args, sizes, work)
        report["data_seconds"] = round(time.perf_counter() - started, 1)
        for round_index in range(rounds):
            for case, spec in round_specs(args.sweep, sizes, threads, folder, shards, work):
                result = {"case": case, **{k: spec[k] for k in ("width", "threads", "workers", "format") if k in spec},
                          "round": round_index, **run_case(case, spec, 900)}
                report["runs"].append(result)
                if "error" in result:
                    report["errors"].append(result)
                shown = f"{result['img_per_s']:.1f} img/s" if "img_per_s" in result else result["error"]
                settings = (f"{spec['format']} shards, {spec['threads']} threads, {spec['workers']} workers"
                            if args.sweep else f"{case:<9}")
                print(f"round {round_index} width {spec['width']:>3} {settings} {shown} "
                      f"(load {result.get('load1_before')})", flush=True)
                report["summary"] = sweep_summary(report["runs"]) if args.sweep else summarise(report["runs"], sizes.widths)
                tt.write_json(out, report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    tt.write_json(out, report)
    if args.sweep:
        print(f"\n{'format':>6} {'threads':>7} {'workers':>7} {'img/s':>8}   (medians)")
        for r in report["summary"]:
            print(f"{r['format']:>6} {r['threads']:>7} {r['workers']:>7} {r['median_img_per_s']:>8.1f}")
    else:
        print(f"\n{'width':>5} " + " ".join(f"{c:>10}" for c in CASES)
              + " " + " ".join(f"{c + '/ref':>9}" for c in TRAINER_CASES) + "   (img/s, medians)")
        for r in report["summary"]:
            m = r["median_img_per_s"]
            cells = [f"{m[c]:>10.1f}" if m[c] is not None else f"{'-':>10}" for c in CASES]
            ratios = [f"{r[k]:>9.2f}" if r[k] is not None else f"{'-':>9}"
                      for k in (f"{c}_vs_reference" for c in TRAINER_CASES)]
            print(f"{r['width']:>5} {' '.join(cells)} {' '.join(ratios)}")
    print(f"{len(report['runs'])} runs, {len(report['errors'])} errors, {report['seconds']}s; {out}", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
