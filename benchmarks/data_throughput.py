"""Data pipeline throughput on this machine: shard build img/s and loader img/s, as a table.

Build: `write_synthetic_celeba` (178x218 JPEGs, not timed) -> `build_shards` in each format, all cores.
Load: `ShardBatchSource` over the train split, batches of 128, 0, 2 and all-core workers, each format,
against the one-image-per-tar-member WebDataset pipeline (decode per sample in the workers, batch
there) that tops out near 48k img/s on a 16-core host. CPU columns come from process and child
rusage: "main" is the training process's share per image, "workers" the loader processes' share.

    python benchmarks/data_throughput.py                 # about 20,000 images; minutes on 2 cores
    python benchmarks/data_throughput.py --small --json table.json   # under a minute, for tests
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import webdataset as wds
from torchvision.io import ImageReadMode, decode_image

from dcgan_dist.config import DataConfig
from dcgan_dist.data.loader import ShardBatchSource
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba

FORMATS = ("png", "jpg", "npy")
BATCH = 128


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(run: Callable[[], int]) -> dict:
    """Run once; wall time, images, and CPU seconds of this process and of the (joined) children."""
    wall, main, children = time.perf_counter(), time.process_time(), _children_cpu()
    images = run()
    wall, main, children = time.perf_counter() - wall, time.process_time() - main, _children_cpu() - children
    return {"images": images, "seconds": round(wall, 3), "img_per_s": round(images / wall),
            "main_cpu_us_per_img": round(main / images * 1e6, 1),
            "worker_cpu_us_per_img": round(children / images * 1e6, 1)}


def shard_batches(folder: Path, workers: int, epochs: int) -> int:
    cfg = DataConfig(source=str(folder), workers=workers)
    src = ShardBatchSource(folder, cfg, batch_size=BATCH, rank=0, world_size=1, seed=0)
    return sum(len(batch.keys) for epoch in range(epochs) for batch in src.batches(epoch))


def _decode_member(fmt: str, sample: dict) -> tuple[torch.Tensor, str]:
    """One tar member to a uint8 CHW tensor, as a per-sample `.map` does (module level: picklable)."""
    data = sample[fmt]
    if fmt == "npy":
        image = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)).permute(2, 0, 1)
    else:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return image, sample["__key__"]


def per_member_batches(folder: Path, fmt: str, workers: int, epochs: int) -> int:
    """The reference pipeline: WebDataset per-sample decode and batching in the workers, WebLoader."""
    urls = [str(folder / s["name"]) for s in json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"]]
    pipeline = (wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker)
                .map(functools.partial(_decode_member, fmt)).shuffle(1000).batched(BATCH, partial=False))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
    return sum(len(keys) for _ in range(epochs) for _, keys in loader)


HEADER = (f"{'stage':<16} {'format':<6} {'workers':>7} {'images':>8} {'seconds':>8} {'img/s':>9} "
          f"{'main CPU us/img':>16} {'worker CPU us/img':>18}")


def line(r: dict) -> str:
    return (f"{r['stage']:<16} {r['format']:<6} {r['workers']:>7} {r['images']:>8} {r['seconds']:>8.2f} "
            f"{r['img_per_s']:>9,} {r['main_cpu_us_per_img']:>16.1f} {_cpu(r['worker_cpu_us_per_img']):>18}")


def _cpu(us: float | None) -> str:
    return "n/a" if us is None else f"{us:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="400 images, one epoch, no per-member rows: under a minute, for tests")
    parser.add_argument("--images", type=int, help="synthetic CelebA images to build from (default 20000; small 400)")
    parser.add_argument("--epochs", type=int, help="loader epochs per row (default 3; small 1)")
    parser.add_argument("--json", type=Path, help="also write the table here as JSON")
    parser.add_argument("--workdir", type=Path, help="keep the synthetic set and shards here (default: a temp dir)")
    args = parser.parse_args(argv)
    count = args.images or (400 if args.small else 20_000)
    epochs = args.epochs or (1 if args.small else 3)
    cores = os.cpu_count() or 1
    worker_counts = sorted({0, 2, cores})
    machine = {"cpus": cores, "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "torch": torch.__version__, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    print(f"# {cores} CPUs, torch {torch.__version__}, load average {machine['load_average_at_start']}, "
          f"{count} synthetic images, batches of {BATCH}, {epochs} epochs per loader row\n{HEADER}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dcgan-throughput-") as tmp:
        work = args.workdir or Path(tmp)
        raw = write_synthetic_celeba(work / "celeba", count, modes=10, seed=0)
        rows = []

        def add(row: dict) -> None:
            rows.append(row)
            print(line(row), flush=True)

        for fmt in FORMATS:
            out = work / f"shards-{fmt}"
            shard_size = 2500 if count >= 10_000 else 100

            def build(fmt=fmt, out=out, shard_size=shard_size) -> int:
                return build_shards(raw, out, fmt=fmt, shard_size=shard_size, workers=cores)["totals"]["samples"]

            # The builder's pool runs under a fork server, whose children's CPU time never reaches this process.
            add({"stage": "build", "format": fmt, "workers": cores, **measure(build), "worker_cpu_us_per_img": None})
            for workers in worker_counts:
                add({"stage": "load", "format": fmt, "workers": workers,
                     **measure(lambda: shard_batches(out, workers, epochs))})
                if not args.small:
                    add({"stage": "load per-member", "format": fmt, "workers": workers,
                         **measure(lambda: per_member_batches(out, fmt, workers, epochs))})

    if args.json:
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps({"machine": machine, "images": count, "epochs": epochs, "batch": BATCH,
                                        "rows": rows}, indent=1) + "\n")
        os.replace(tmp_json, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
