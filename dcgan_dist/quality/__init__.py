"""Measured sample quality: FID, KID and precision/recall of a generator against real shards.

* `distances`: the numbers from feature sets (FID from means and covariances, unbiased KID over
  subsets, k-NN precision/recall), float64, no scipy.
* `inception`: the standard FID network (the TF Inception graph of 2015-12-05, pool3, 2048
  features) as TorchScript, found offline and hash-checked; uint8 64x64 images in, features out.
* `reference`: the real split's features and statistics, cached beside the shards per manifest.
* `generator`: which weights file, how G is sampled (BatchNorm statistics), latents, uint8 images.
* `evaluate` (`dcgan-eval`) and `sample` (`dcgan-sample`): the command lines.

Nothing here imports torch at package import, so both commands answer `--help` at once.
"""
from __future__ import annotations


class QualityError(ValueError):
    """Bad input to an evaluation or sampling command: one line naming the file or flag and what was expected."""
