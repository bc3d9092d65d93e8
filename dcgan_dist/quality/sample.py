"""dcgan-sample: images from a trained generator, as a grid, an interpolation, or files for other tools.

    dcgan-sample runs/celeba --grid grid.png --n 64 --seed 1
    dcgan-sample runs/celeba --interpolate 4 --frames 8 --out walk.gif
    dcgan-sample runs/celeba --count 10000 --out-dir samples/

--interpolate K: K latents joined by spherical interpolation, F frames per step. A .png shows one row
per step (z1 -> z2, z2 -> z3, ..., endpoints included); a .gif loops z1 -> ... -> zK -> z1.
--bn says which BatchNorm statistics G samples with: `batch` (default) normalises each batch with its
own statistics, as training and the trainer's sample grids do; interpolation frames are normalised
with the statistics of a random batch of --batch-size latents drawn after the K, since the frames of
one path are too alike to be a batch. `running`: eval mode, the running averages saved with G.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "dcgan-sample"
GIF_FRAME_MS = 100


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights_path", metavar="RUN_DIR|G.safetensors", type=Path,
                        help="a run directory (its generator export) or a generator .safetensors file")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--grid", type=Path, metavar="OUT.png", help="write one grid of --n samples")
    mode.add_argument("--interpolate", type=int, metavar="K", help="interpolate between K latents (K >= 2)")
    mode.add_argument("--count", type=int, metavar="N", help="write N samples as PNG files into --out-dir")
    parser.add_argument("--n", type=int, default=64, help="--grid: samples (default %(default)s)")
    parser.add_argument("--nrow", type=int, default=8, help="--grid: images per row (default %(default)s)")
    parser.add_argument("--frames", type=int, default=8, help="--interpolate: frames per step (default %(default)s)")
    parser.add_argument("--out", type=Path, metavar="OUT.png|OUT.gif", help="--interpolate: output file")
    parser.add_argument("--out-dir", type=Path, metavar="DIR", help="--count: a new or empty folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents (default %(default)s)")
    parser.add_argument("--weights", choices=["raw", "ema"], default=None,
                        help="with RUN_DIR: G's moving average (ema) or G itself (raw); default: "
                             "RUN_DIR/generator.safetensors, the average when the run keeps one")
    parser.add_argument("--bn", choices=["batch", "running"], default="batch",
                        help="BatchNorm statistics: each batch's own, as in training (default), or running averages")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="generator batch, the batch each image is normalised in with --bn batch (default %(default)s)")
    return parser


def _check_args(args: argparse.Namespace) -> str | None:
    for flag, value, least in (("--n", args.n, 1), ("--nrow", args.nrow, 1), ("--frames", args.frames, 2),
                               ("--batch-size", args.batch_size, 1), ("--interpolate", args.interpolate, 2),
                               ("--count", args.count, 1)):
        if value is not None and value < least:
            return f"{flag}: got {value}, expected at least {least}"
    if args.grid is not None and args.grid.suffix.lower() != ".png":
        return f"--grid {args.grid}: expected a .png file name"
    if args.interpolate is not None and args.out is None:
        return "--interpolate: needs --out OUT.png or OUT.gif"
    if args.interpolate is not None and args.out.suffix.lower() not in (".png", ".gif"):
        return f"--out {args.out}: expected a .png or .gif file name"
    if args.count is not None:
        if args.out_dir is None:
            return "--out-dir: --count needs a folder to write into"
        if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
            return f"--out-dir {args.out_dir}: not an empty folder (tools that read a folder would see other files too)"
    for flag, value, used in (("--out", args.out, args.interpolate), ("--out-dir", args.out_dir, args.count)):
        if value is not None and used is None:
            return f"{flag}: only with {'--interpolate' if flag == '--out' else '--count'}"
    return None


def _save_png(image, path: Path) -> None:
    """uint8 (3, H, W) -> PNG, atomically."""
    from PIL import Image

    from dcgan_dist.fileio import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def _save_gif(frames, path: Path) -> None:
    from PIL import Image

    from dcgan_dist.fileio import atomic_path

    images = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)


def run(args: argparse.Namespace) -> str:
    """Write what was asked for; returns the line to print."""
    import torch
    from torchvision.utils import make_grid

    from dcgan_dist.quality import generator

    file = generator.weights_file(args.weights_path, args.weights)
    G, _ = generator.load(file)
    how = f"BatchNorm {args.bn} statistics, seed {args.seed}, {file}"
    if args.grid is not None:
        images = generator.generate(G, generator.latents(args.n, G.nz, args.seed), args.bn, batch_size=args.batch_size)
        _save_png(make_grid(images, nrow=args.nrow, padding=2), args.grid)
        return f"wrote {args.grid}: {args.n} samples, {args.nrow} per row ({how})"
    if args.interpolate is not None:
        k, f = args.interpolate, args.frames
        z = generator.latents(k + args.batch_size, G.nz, args.seed)
        keys, reference = z[:k], z[k:]
        if args.out.suffix.lower() == ".gif":  # a closed loop, each key frame once
            steps = [(i, (i + 1) % k, torch.linspace(0, 1, f + 1)[:-1]) for i in range(k)]
        else:  # one row per step, both endpoints shown
            steps = [(i, i + 1, torch.linspace(0, 1, f)) for i in range(k - 1)]
        path = torch.cat([generator.slerp(keys[a], keys[b], t) for a, b, t in steps])
        if args.bn == "batch":
            frames = generator.generate_with_statistics_of(G, path, reference)
        else:
            frames = generator.generate(G, path, "running", batch_size=args.batch_size)
        if args.out.suffix.lower() == ".gif":
            _save_gif(frames, args.out)
        else:
            _save_png(make_grid(frames, nrow=f, padding=2), args.out)
        return f"wrote {args.out}: {len(frames)} frames through {k} latents ({how})"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    z = generator.latents(args.count, G.nz, args.seed)
    for start in range(0, args.count, args.batch_size):
        images = generator.generate(G, z[start:start + args.batch_size], args.bn, batch_size=args.batch_size)
        for i, image in enumerate(images, start):
            _save_png(image, args.out_dir / f"{i:06d}.png")
    return f"wrote {args.count} PNG files to {args.out_dir} ({how})"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # before importing torch: --help and usage errors answer at once
    problem = _check_args(args)
    if problem is None:
        from dcgan_dist.quality import QualityError

        try:
            print(f"{PROG}: {run(args)}")
            return 0
        except QualityError as e:
            problem = str(e)
    print(f"{PROG}: error: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
