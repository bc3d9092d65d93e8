"""Build time: CelebA (or any folder of images, or synthetic faces) to WebDataset shards and manifest.json.

`celeba` finds the images and parses CelebA's lists, `synth` writes synthetic faces in the same
layout, `pack` preprocesses and packs them into shards, `verify` re-reads shards against their
manifest, `cli` is `dcgan-shards`. Training reads the result through `dcgan_dist.data.loader`.
"""
from __future__ import annotations


class ShardError(ValueError):
    """Bad input for shard building, as one line naming the file and what was expected."""
