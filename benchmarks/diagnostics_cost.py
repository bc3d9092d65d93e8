"""What the failure-mode diagnostics cost against training steps (the figures in docs/failure_modes.md).

    python benchmarks/diagnostics_cost.py            # smoke size: ngf=ndf=32, batch 64
    python benchmarks/diagnostics_cost.py --ngf 64 --batch 128 --device cuda

CPU time of this process on a CPU (robust to other load on a shared machine), wall time with
synchronisation on a GPU. Prints a table: one step, gradient-norm collection, one check and its
parts, and the checks' share of step time at several `diag.every`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image

from dcgan_dist.config import DiagConfig, LossConfig
from dcgan_dist.data.images import lab_transform, list_images
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.diagnostics import Diagnostics, RealReference
from dcgan_dist.diagnostics.similarity import feature_spread, mean_ms_ssim
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.step import GANStep


class _Quiet:
    """A RunLogger that drops everything."""

    def scalars(self, *args) -> None: ...
    def text(self, *args) -> None: ...
    def message(self, *args) -> None: ...


def synthetic_batch(count: int, modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_celeba(Path(tmp) / "celeba", count, modes, seed=0)
        ids = dict(line.split() for line in (root / "identity_CelebA.txt").read_text().splitlines())
        files = list_images(root / "img_align_celeba")
        transform = lab_transform(64)
        images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        return images, torch.tensor([int(ids[f.name]) for f in files])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: CPU times add up cleanly)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = device.type == "cpu"

    def clock() -> float:
        if not cpu:
            torch.cuda.synchronize()
        return time.process_time() if cpu else time.perf_counter()

    images, labels = synthetic_batch(1600, 10)
    acc = Accelerator(cpu=cpu)
    torch.manual_seed(0)
    G, D = Generator(100, args.ngf), Discriminator(args.ngf)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    step = GANStep(acc, G, D, opt_g, opt_d, LossConfig(), 100, 0)
    batch = images[:args.batch]
    with tempfile.TemporaryDirectory() as run_dir:
        t = clock()
        diag = Diagnostics(DiagConfig(), RealReference(images[:1536], labels[:1536], 10), Path(run_dir), 100, device)
        setup = clock() - t
        for _ in range(3):
            step(batch)
        n = 20
        t = clock()
        for _ in range(n):
            step(batch)
        step_s = (clock() - t) / n
        t = clock()
        outs = [step(batch, collect_grad_norms=True) for _ in range(5)]
        collect_s = max((clock() - t) / 5 - step_s, 0.0)
        t = clock()
        for i, out in enumerate(outs):
            diag(50 * (i + 1), out, acc.unwrap_model(G), _Quiet())
        check_s = (clock() - t) / len(outs)
        samples = diag.generate(acc.unwrap_model(G))
        parts = {"G forward (256 samples)": lambda: diag.generate(acc.unwrap_model(G)),
                 "MS-SSIM (64 samples)": lambda: mean_ms_ssim(samples[:64]),
                 "feature spread (256)": lambda: feature_spread(diag.features(samples)),
                 "mode classifier (256)": lambda: diag.classifier.predict(samples)}
        unit = "CPU time" if cpu else "wall time"
        print(f"ngf=ndf={args.ngf}, batch {args.batch}, {device}, {unit}")
        print(f"| | {unit} |\n|---|---|")
        print(f"| start-up (real reference, classifier fit) | {setup * 1000:.0f} ms |")
        print(f"| one training step | {step_s * 1000:.0f} ms |")
        print(f"| gradient-norm collection in a step | +{collect_s * 1000:.0f} ms |")
        print(f"| one check | {check_s * 1000:.0f} ms |")
        for name, fn in parts.items():
            t = clock()
            fn()
            print(f"| - {name} | {(clock() - t) * 1000:.0f} ms |")
        for every in (25, 50, 100):
            print(f"| share of step time at diag.every={every} | {100 * (check_s + collect_s) / (every * step_s):.1f}% |")


if __name__ == "__main__":
    main()
