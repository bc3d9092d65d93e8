"""FID and KID during training, every `eval.every` steps, and the best checkpoint kept apart.

Each evaluation draws `eval.samples` images from G, and as many from its moving average when the
run keeps one, exactly as `dcgan-eval` draws them (the same latents from `run.seed`, BatchNorm batch
statistics in batches of 64), and compares their Inception features with those of the first
`eval.real` images of split `eval.split` of the training shards (cached beside them, see
reference.py). So `dcgan-eval RUN --samples N --real M --split S --seed SEED` on the same weights
gives the same numbers.

Results: TensorBoard `quality/fid`, `quality/kid` (and `quality/fid_ema`, `quality/kid_ema`),
and RUN/quality.json, rewritten atomically after each evaluation. The checkpoint with the lowest FID
(of the EMA when there is one) is saved as a run folder of its own, RUN/best/ (a checkpoint under
RUN/best/checkpoints/ and its generator exports), apart from the rolling `ckpt.keep` checkpoints, so
pruning, `latest_checkpoint` and resuming never see it; quality.json's `best` says which step it is.

Every rank generates the images (a SyncBatchNorm G runs collectives in train mode, and the ranks stay
in step); only the main process extracts features and writes. The verdict "new best" is then shared
by one all-reduce, so every rank takes part in saving the best checkpoint.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from dcgan_dist.config import Config, ConfigError
from dcgan_dist.fileio import atomic_write

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dcgan_dist.metrics import RunLogger
    from dcgan_dist.step import GANStep

QUALITY_JSON = "quality.json"
BEST_DIR = "best"  # a run folder of its own inside the run folder: checkpoints/step-N/ and the generator exports
BN_MODE = "batch"  # as in training and dcgan-eval's default


def _as_exported(G: torch.nn.Module) -> torch.nn.Module:
    """A copy of G in the default (contiguous) memory layout, the one `dcgan-eval` loads its file in."""
    return copy.deepcopy(G).to(memory_format=torch.contiguous_format)


def check_eval_config(cfg: Config) -> tuple[Path, Path | None]:
    """The shard folder and FID network an evaluation during training will use (None: the standard one,
    found installed); one-line ConfigError when they are not there. Cheap: every rank calls it."""
    from dcgan_dist.data.manifest import MANIFEST_NAME, read_manifest
    from dcgan_dist.quality.inception import INSTALL, default_network_path

    shards = Path(cfg.data.source)
    if not (shards / MANIFEST_NAME).is_file():
        raise ConfigError(f"config key 'eval.every': got {cfg.eval.every}, which needs data.source to be a shard "
                          f"folder (with {MANIFEST_NAME}), got {cfg.data.source!r}; build one with dcgan-shards build "
                          "or set eval.every=0")
    try:
        splits = json.loads((shards / MANIFEST_NAME).read_text()).get("splits")
    except (OSError, ValueError, AttributeError):
        splits = None  # read_manifest below names what is wrong with the file
    if isinstance(splits, dict) and cfg.eval.split not in splits:
        raise ConfigError(f"config key 'eval.split': got {cfg.eval.split!r}, expected a split of {shards}: "
                          f"{', '.join(splits) or 'none'}")
    read_manifest(shards, cfg.eval.split)
    if cfg.eval.inception:
        network = Path(cfg.eval.inception)
        if not network.is_file():
            raise ConfigError(f"config key 'eval.inception': {network}: no such file, expected a TorchScript "
                              "FID network (or \"\" for the standard one)")
        return shards, network
    if default_network_path() is None:
        raise ConfigError(f"config key 'eval.every': evaluating needs the FID network: {INSTALL} "
                          "(or set eval.inception to a compatible TorchScript file, or eval.every=0)")
    return shards, None


class TrainingEvaluator:
    """Construct with `for_run` on every rank; call on every rank at the steps `due` names."""

    def __init__(self, cfg: Config, shards: Path, network: Path | None, run_dir: Path, accelerator: Accelerator,
                 start_step: int, ema: bool, log: RunLogger):
        from dcgan_dist.quality.generator import latents

        self.cfg, self.shards, self.run_dir, self.log = cfg.eval, shards, Path(run_dir), log
        self.accelerator, self.ema, self.seed = accelerator, ema, cfg.run.seed
        self.metric = "fid_ema" if ema else "fid"
        self.path = self.run_dir / QUALITY_JSON
        self.z = latents(cfg.eval.samples, cfg.model.nz, cfg.run.seed)  # every evaluation: the same latents
        self.main = accelerator.is_main_process
        self.extractor = self.reference = None
        self.evaluations: list[dict] = []
        self.best: dict | None = None
        self.previous: dict | None = None
        if self.main:
            from dcgan_dist.quality import QualityError
            from dcgan_dist.quality.inception import FeatureExtractor

            try:
                self.extractor = FeatureExtractor(network, device=accelerator.device)
            except QualityError as exc:
                raise ConfigError(f"config key 'eval.inception': {exc}") from None
            self.previous = self._read_previous(start_step)

    @classmethod
    def for_run(cls, cfg: Config, accelerator: Accelerator, run_dir: Path, start_step: int, ema: bool,
                log: RunLogger) -> TrainingEvaluator | None:
        """The run's evaluator, or None with `eval.every` 0."""
        if cfg.eval.every == 0:
            return None
        shards, network = check_eval_config(cfg)
        evaluator = cls(cfg, shards, network, run_dir, accelerator, start_step, ema, log)
        which = "G and its moving average" if ema else "G"
        log.message(f"[quality] every {cfg.eval.every} steps: FID/KID of {cfg.eval.samples:,} images of {which} "
                    f"against {cfg.eval.real:,} real images of split {cfg.eval.split!r} of {shards}; "
                    f"results in {evaluator.path}, the best checkpoint in {evaluator.run_dir / BEST_DIR}")
        return evaluator

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0

    def _read_previous(self, start_step: int) -> dict | None:
        """What an earlier start of this run recorded, up to the step it resumes from (as TensorBoard's purge)."""
        if not self.path.is_file():
            return None
        try:
            previous = json.loads(self.path.read_text())
            previous["evaluations"] = [e for e in previous["evaluations"] if e["step"] <= start_step]
            return previous
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log.message(f"[quality] {self.path}: unreadable ({type(exc).__name__}), starting a new record")
            return None

    def _start_record(self, settings: dict) -> None:
        """Adopt the earlier record if it was made with the same settings (else its numbers do not compare)."""
        previous, self.previous = self.previous, None
        if previous is None:
            return
        if previous.get("settings") != settings or previous.get("metric") != self.metric:
            self.log.message(f"[quality] {self.path}: earlier evaluations used other settings; starting a new record")
            return
        self.evaluations = previous["evaluations"]
        best = previous.get("best")
        if best is not None and (self.run_dir / best["checkpoint"]).is_dir():
            self.best = best

    def _settings(self) -> dict:
        from dcgan_dist.quality.generator import BATCH_SIZE

        return {"samples": self.cfg.samples, "real": self.reference.count, "split": self.cfg.split,
                "shards": str(self.shards), "manifest_sha256": self.reference.manifest_sha256,
                "network": self.extractor.describe(), "bn": BN_MODE, "batch_size": BATCH_SIZE, "seed": self.seed}

    def __call__(self, step: int, gan_step: GANStep, save_best: Callable[[], Path]) -> dict[str, float]:
        """Evaluate at `step` (every rank); on a new best, every rank calls `save_best()`, which returns
        the checkpoint it wrote. Returns the numbers logged (main process; empty elsewhere)."""
        from dcgan_dist.quality.generator import generate
        from dcgan_dist.stats import reduce_by_name

        started = time.perf_counter()
        models = {"": self.accelerator.unwrap_model(gan_step.G)}
        if gan_step.ema is not None:
            models["_ema"] = gan_step.ema.model
        # every rank; from G in the layout its exported file loads in (contiguous), as dcgan-eval draws:
        # the training copy may be channels_last, whose convolutions round differently
        images = {suffix: generate(_as_exported(G), self.z, BN_MODE) for suffix, G in models.items()}
        values = self._measure(images) if self.main else {}
        metric = values.get(self.metric, math.nan)
        new_best = self.main and math.isfinite(metric) and (self.best is None or metric < self.best["value"])
        flags = reduce_by_name(self.accelerator, {"new_best": torch.tensor(float(new_best),
                                                                           device=self.accelerator.device)})
        checkpoint = save_best() if flags["new_best"] > 0 else None  # a collective: every rank or none
        if not self.main:
            return {}
        seconds = time.perf_counter() - started
        if checkpoint is not None:
            self.best = {"step": step, "value": metric,
                         "checkpoint": Path(checkpoint).relative_to(self.run_dir).as_posix()}
        self.evaluations = [e for e in self.evaluations if e["step"] != step]
        self.evaluations.append({"step": step, **values, "seconds": round(seconds, 3)})
        self._write()
        self.log.scalars(step, {f"quality/{name}": v for name, v in values.items() if not name.startswith("kid_std")})
        self.log.message(self._line(step, values, seconds, checkpoint is not None))
        return values

    def _measure(self, images: dict[str, torch.Tensor]) -> dict[str, float]:
        """FID, KID and KID's spread of each image set against the reference (main process)."""
        from dcgan_dist.quality import distances
        from dcgan_dist.quality.reference import reference_stats

        if self.reference is None:
            self.reference = reference_stats(self.shards, self.cfg.split, self.cfg.real, self.extractor,
                                             log=lambda m: self.log.message(f"[quality] {m}"))
            self._start_record(self._settings())
        values = {}
        for suffix, generated in images.items():
            fake = self.extractor.features(generated)
            mu, sigma = distances.feature_stats(fake)
            kid_mean, kid_std = distances.kid(self.reference.features, fake, seed=self.seed,
                                              device=self.accelerator.device)
            values.update({f"fid{suffix}": distances.fid_from_stats(self.reference.mu, self.reference.sigma, mu, sigma),
                           f"kid{suffix}": kid_mean, f"kid_std{suffix}": kid_std})
        return values

    def _write(self) -> None:
        record = {"metric": self.metric, "best": self.best, "settings": self._settings(),
                  "evaluations": self.evaluations}
        atomic_write(self.path, json.dumps(record, indent=1) + "\n")

    def _line(self, step: int, values: dict[str, float], seconds: float, new_best: bool) -> str:
        def pair(name: str, scale: float = 1.0) -> str:
            text = f"{values[name] * scale:.2f}"
            return text + (f" (EMA {values[name + '_ema'] * scale:.2f})" if name + "_ema" in values else "")

        best = f"; new best, saved in {self.run_dir / self.best['checkpoint']}" if new_best else ""
        return (f"[quality] step {step}: FID {pair('fid')}, KID x 1000 {pair('kid', 1000)} "
                f"({self.cfg.samples:,} generated vs {self.reference.count:,} real {self.cfg.split}; "
                f"FID biased upward at small counts, KID unbiased); {seconds:.1f} s{best}")
