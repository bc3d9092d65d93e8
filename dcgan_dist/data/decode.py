"""Indexed shard samples to a uint8 (N, 3, 64, 64) batch, a whole batch per call.

npy payloads that `np.save` wrote as expected are gathered with one strided view per shard and
transposed to NCHW in one numpy call; any other npy header goes through
`np.load(allow_pickle=False)`, so nothing is unpickled. png/jpg go through torchvision's decoder,
one call per image, when the loader has checked the bytes against the manifest's checksums first:
torchvision's PNG decoder kills the process (a segmentation fault) on damaged data. Shards built
before checksums were recorded decode through PIL, which raises instead, at about half the speed.
Problems raise `ConfigError` naming the shard and the member.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from dcgan_dist.config import ConfigError
from dcgan_dist.data.manifest import SIZE
from dcgan_dist.data.shard_index import ShardSamples
from dcgan_dist.errors import first_line

# torchvision 0.29 deprecates its decoders in favour of torchcodec; they stay because they decode png/jpg
# 1.4-2.3x faster than PIL here, and the warning would otherwise be raised once per decoded image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _load_npy(samples: ShardSamples, i: int) -> np.ndarray:
    """Sample i's npy payload through `np.load(allow_pickle=False)`: for headers `np.save` did not write as expected."""
    where = f"shard {samples.path}: {samples.keys[i]}.npy"
    try:
        array = np.load(io.BytesIO(samples.data[samples.image_starts[i]:samples.image_ends[i]]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"{where} is not a plain npy array ({first_line(e)})") from None
    if array.dtype != np.uint8 or array.shape != (SIZE, SIZE, 3):
        raise ConfigError(f"{where} is {array.dtype} {array.shape}, expected uint8 ({SIZE}, {SIZE}, 3)")
    return array


def _decode_unchecked(payload: bytearray) -> torch.Tensor:
    """PIL's decode to uint8 CHW: bytes no checksum vouches for may be damaged, and PIL raises where torchvision crashes."""
    with Image.open(io.BytesIO(payload)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def decode_batch(fmt: str, items: list[tuple[ShardSamples, int]]) -> torch.Tensor:
    """uint8 (N, 3, 64, 64), contiguous, for samples given as (shard, index in shard).

    npy: one gather and HWC -> CHW copy per shard in the batch (numpy, single-threaded: torch's uint8
    permute().contiguous() is no faster on one thread and 10x slower with two). png/jpg: one
    torchvision decode per image, 1.4x (png) and 2.3x (jpg) PIL's speed on 64x64 faces here; torchvision
    0.29 deprecates it in favour of torchcodec, so a future torchvision needs this call replaced.
    """
    images = torch.empty((len(items), 3, SIZE, SIZE), dtype=torch.uint8)
    if fmt == "npy":
        chw = images.numpy().reshape(len(items), 3, SIZE * SIZE)
        groups: dict[int, tuple[ShardSamples, list[int], list[int]]] = {}
        for n, (samples, i) in enumerate(items):
            row = samples.rows[i]
            if row < 0:
                chw[n] = _load_npy(samples, i).reshape(SIZE * SIZE, 3).T
                continue
            group = groups.setdefault(id(samples), (samples, [], []))
            group[1].append(n)
            group[2].append(row)
        for samples, positions, rows in groups.values():
            chw[positions] = samples.pixel_rows[rows].reshape(len(rows), SIZE * SIZE, 3).transpose(0, 2, 1)
        return images
    for n, (samples, i) in enumerate(items):
        payload = bytearray(samples.data[samples.image_starts[i]:samples.image_ends[i]])  # writable for frombuffer
        where = f"shard {samples.path}: {samples.keys[i]}.{fmt}"
        try:
            if samples.crc32 is None:
                image = _decode_unchecked(payload)
            else:
                image = decode_image(torch.frombuffer(payload, dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception as e:  # decoders raise many types for damaged data
            raise ConfigError(f"{where} does not decode ({first_line(e)})") from None
        if image.shape != images.shape[1:]:
            raise ConfigError(f"{where} is {tuple(image.shape)} (C, H, W), expected (3, {SIZE}, {SIZE})")
        images[n] = image
    return images
