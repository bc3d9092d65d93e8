"""`data.source: synthetic`: synthetic CelebA and its shards, built once and then reused."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dcgan_dist.config import DataConfig
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.data.manifest import is_shard_folder

RENDER_VERSION = {"photo": "1", "flat": "1"}  # bumped when a renderer's output changes

if TYPE_CHECKING:
    from accelerate import Accelerator


def resolve_source(data: DataConfig, seed: int, accelerator: Accelerator) -> str:
    """The folder to read for `data.source`: itself, or for "synthetic" the shards of synthetic CelebA,
    written under shards/ by the main process (seeded by `seed`) the first time while the others wait
    (parallel.on_main_process: if writing fails, every rank stops instead of waiting)."""
    from dcgan_dist.parallel import on_main_process

    if data.source != "synthetic":
        return data.source
    # the folder names what it holds, so another style or count (or a changed renderer) never reuses it
    root = Path("shards") / f"synthetic-{data.synthetic_style}{RENDER_VERSION[data.synthetic_style]}-" \
        f"{data.synthetic_count}x{data.synthetic_modes}"
    shards = root / "celeba64"

    def write() -> None:
        if not is_shard_folder(shards):
            print(f"[dcgan-train] writing synthetic CelebA ({data.synthetic_count} {data.synthetic_style} images, "
                  f"{data.synthetic_modes} modes) and its shards under {root}", flush=True)
            write_synthetic_celeba(root / "celeba", data.synthetic_count, data.synthetic_modes, seed=seed,
                                   style=data.synthetic_style)
            build_shards(root / "celeba", shards)

    on_main_process(accelerator, f"write the synthetic data under {root}", write)
    return str(shards)
