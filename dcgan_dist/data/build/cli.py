"""`dcgan-shards`: CelebA (or any folder of images) to preprocessed WebDataset tar shards.

Arguments are parsed before the builders are imported (they bring in torch and torchvision), so
`--help` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcgan_dist.data.build import ShardError

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgan-shards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build shards from CelebA or a folder of images")
    build.add_argument("--source", required=True, type=Path,
                       help="CelebA release folder, torchvision ROOT, img_align_celeba.zip, or a folder of images")
    build.add_argument("--out", type=Path, default=Path("shards/celeba64"), help="output folder (default %(default)s)")
    build.add_argument("--size", type=int, default=64, help="output side in pixels (default %(default)s)")
    build.add_argument("--format", choices=["png", "jpg", "raw"], default="png",
                       help="png: lossless (default); jpg: small, lossy; raw: uint8 .npy, fastest to load")
    build.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default %(default)s)")
    build.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    build.add_argument("--valid-fraction", type=float, default=0.1,
                       help="without a partition file: share of images for the valid split (default %(default)s)")
    build.add_argument("--seed", type=int, default=0, help="seed of that split (default %(default)s)")
    build.add_argument("--allow-missing", action="store_true",
                       help="build from the images present when the partition file lists more (partial download)")
    build.add_argument("--strict", action="store_true", help="fail on the first unreadable input instead of skipping it")
    build.add_argument("--crop", action="store_true", help="take a centred face crop (108/178 of the width) first")
    build.add_argument("--fast-decode", action="store_true",
                       help="decode JPEGs at reduced scale: faster, but not pixel-identical to the lab's transform")
    verify = commands.add_parser("verify", help="re-read every shard against manifest.json")
    verify.add_argument("dir", type=Path)
    verify.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth = commands.add_parser("synth", help="write synthetic faces in CelebA's release layout")
    synth.add_argument("--out", required=True, type=Path, help="folder to write (the SRC of a later build)")
    synth.add_argument("--count", type=int, required=True, help="number of images")
    synth.add_argument("--modes", type=int, default=10, help="number of visually distinct modes (default %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    synth.add_argument("--style", choices=["photo", "flat"], default="photo",
                       help="photo: shaded, textured faces a DCGAN learns (default); flat: hard-edged cartoons")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.command == "build":
            from dcgan_dist.data.build.pack import build_shards

            build_shards(args.source, args.out, size=args.size, fmt=args.format, shard_size=args.shard_size,
                         workers=args.workers, valid_fraction=args.valid_fraction, allow_missing=args.allow_missing,
                         strict=args.strict, crop=args.crop, seed=args.seed, fast_decode=args.fast_decode, log=log)
        elif args.command == "verify":
            from dcgan_dist.data.build.verify import verify_shards
            from dcgan_dist.data.manifest import load_manifest

            problems = verify_shards(args.dir, workers=args.workers)
            for problem in problems:
                print(problem)
            if problems:
                log(f"{args.dir}: {len(problems)} problems")
                return 1
            totals = load_manifest(args.dir)["totals"]
            log(f"{args.dir}: OK, {totals['shards']} shards, {totals['samples']:,} samples")
        else:
            from dcgan_dist.data.build.synth import write_synthetic_celeba

            try:
                write_synthetic_celeba(args.out, args.count, modes=args.modes, seed=args.seed, style=args.style)
            except ValueError as e:
                raise ShardError(str(e)) from None
            log(f"{args.out}: {args.count:,} synthetic {args.style} faces in {args.modes} modes")
    except ShardError as e:
        print(f"dcgan-shards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
