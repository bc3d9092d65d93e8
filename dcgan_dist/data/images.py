"""A folder of images (any nesting) read with torchvision, the lab's original input path."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional

from dcgan_dist.config import ConfigError, DataConfig
from dcgan_dist.data import Batch, worker_ignores_sigterm
from dcgan_dist.data.epochs import epoch_permutation

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def lab_resize(image: Image.Image, size: int) -> Image.Image:
    """The lab's Resize(size) + CenterCrop(size): shorter side to `size` (PIL bilinear, antialiased), centre square.

    The shard builder applies it once per image; the image-folder reader every epoch.
    """
    return functional.center_crop(functional.resize(image, size), size)


def lab_transform(size: int = 64) -> Callable[[Image.Image], torch.Tensor]:
    """`lab_resize` as uint8 CHW; scaling to [-1, 1] happens on the device."""
    return functools.partial(_lab_tensor, size=size)


def _lab_tensor(image: Image.Image, size: int) -> torch.Tensor:
    return functional.pil_to_tensor(lab_resize(image, size))


def list_images(root: Path) -> list[Path]:
    """Every image file below `root`, in a sorted (reproducible) order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class _Files(Dataset):
    def __init__(self, files: list[Path], size: int):
        self.files = files
        self.transform = lab_transform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), self.files[i].stem


def _collate(items: list[tuple[torch.Tensor, str]]) -> Batch:
    return Batch(torch.stack([t for t, _ in items]), [k for _, k in items])


class ImageFolderSource:
    """Decodes and resizes every image every epoch; shards (dcgan-shards) are the fast path."""

    def __init__(self, root: Path, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 size: int = 64):
        self.root, self.cfg = Path(root), cfg
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.files = list_images(self.root)
        self.samples = len(self.files)
        self.batches_per_epoch = self.samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"config key 'data.source': {root} has {self.samples} images, expected at least "
                f"{world_size * batch_size} (train.batch_size x processes)"
            )
        self.dataset = _Files(self.files, size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        per_rank = self.batches_per_epoch * self.batch_size
        order = epoch_permutation(self.samples, self.seed, epoch)
        mine = order[self.rank::self.world_size][:per_rank]
        index_batches = mine[start * self.batch_size:].view(-1, self.batch_size).tolist()
        loader = DataLoader(self.dataset, batch_sampler=index_batches, num_workers=self.cfg.workers,
                            collate_fn=_collate, pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                            worker_init_fn=worker_ignores_sigterm)
        yield from loader

    def describe(self) -> str:
        return (f"image folder {self.root}: {self.samples} images, {self.batches_per_epoch} batches of "
                f"{self.batch_size} per epoch per process ({self.world_size} processes)")
