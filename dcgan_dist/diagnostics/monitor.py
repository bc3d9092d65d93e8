"""Failure-mode diagnostics during training, written by the main process every `diag.every` steps.

Per check: G's and D's gradient norms (per layer and total, from the step's unscaled gradients),
G's norm relative to its early value, the diversity of generated samples beside that of real
ones (mean pairwise MS-SSIM, and the spread in a fixed random feature space), mode coverage
when the data has known modes, and the two alarms. D(x), D(G(z)) and the fraction of positive
logits are the step's named statistics (stats.py) and are not logged again here.

Samples come from a fixed z of their own and G in train mode (batch statistics, as D sees G's
output in training); G's BatchNorm running statistics are restored afterwards, so a check
changes neither the training trajectory nor what a checkpoint holds.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from dcgan_dist.config import Config, DataConfig, DiagConfig
from dcgan_dist.data import BatchSource
from dcgan_dist.diagnostics import DIAGNOSTICS_JSON
from dcgan_dist.data.manifest import is_shard_folder, synthetic_modes
from dcgan_dist.diagnostics.alarms import (MODE_COLLAPSE, VANISHING_GRADIENTS, Alarm, collapse_condition,
                                           vanishing_condition)
from dcgan_dist.diagnostics.coverage import ModeClassifier, modes_present
from dcgan_dist.diagnostics.similarity import (RandomFeatures, distinct_count, feature_spread, mean_ms_ssim,
                                              pairwise_ms_ssim)
from dcgan_dist.fileio import atomic_write
from dcgan_dist.metrics import RunLogger
from dcgan_dist.models import sample_with_batch_statistics
from dcgan_dist.step import StepOutput

HOLDOUT_FRACTION = 1 / 3  # of the real reference samples, kept from the coverage classifier to test it
_Z_SEED = 0x5EED  # the diagnostics' z stream, apart from training's


@dataclass
class RealReference:
    """Real samples to compare with, and their modes when the data has known modes."""

    images: torch.Tensor  # uint8 (N, 3, 64, 64)
    labels: torch.Tensor | None = None  # mode of each image, 0..modes-1
    modes: int | None = None


def real_reference(data: DataConfig, source: BatchSource, count: int) -> RealReference:
    """`count` real samples: from the shards with `read_samples` (with modes for synthetic data), else the first batches."""
    path = Path(data.source)
    if is_shard_folder(path):
        from dcgan_dist.data.loader import read_samples

        images, metas = read_samples(path, data.split, limit=count)
        modes = synthetic_modes(path)
        if modes:
            return RealReference(images, torch.tensor([int(m["identity"]) for m in metas]), modes)
        return RealReference(images)
    chunks, have = [], 0
    for batch in source.batches(0):
        chunks.append(batch.images)
        have += batch.images.shape[0]
        if have >= count:
            break
    return RealReference(torch.cat(chunks)[:count])


class Diagnostics:
    """Construct once (real reference in hand); call on every rank at the steps `due` names.

    Every rank generates the check's samples (a SyncBatchNorm G runs collectives in train mode);
    only the rank given the reference measures, logs and writes `RUN/diagnostics.json`.
    """

    def __init__(self, cfg: DiagConfig, reference: RealReference | None, run_dir: Path, nz: int,
                 device: torch.device, start_step: int = 0):
        self.cfg = cfg
        self.z = torch.randn(cfg.samples, nz, 1, 1, generator=torch.Generator().manual_seed(_Z_SEED)).to(device)
        self.path = Path(run_dir) / DIAGNOSTICS_JSON
        self.measuring = reference is not None
        self.alarms = {VANISHING_GRADIENTS: Alarm(cfg.vanishing_patience), MODE_COLLAPSE: Alarm(cfg.collapse_patience)}
        self.events: list[dict] = []
        self.early_g_norms: list[float] = []
        if not self.measuring:
            return
        self.features = RandomFeatures()
        real = reference.images
        held = int(round(real.shape[0] * HOLDOUT_FRACTION))
        self.reference = {"real_samples": real.shape[0],
                          "real_ms_ssim": mean_ms_ssim(real[:cfg.similarity_samples]),
                          "real_feature_spread": feature_spread(self.features(real[:cfg.samples]))}
        self.classifier = None
        if reference.labels is not None and reference.modes and held > 0:
            fit, test = slice(0, real.shape[0] - held), slice(real.shape[0] - held, None)
            self.classifier = ModeClassifier.fit(real[fit], reference.labels[fit], reference.modes)
            self.reference.update(modes=reference.modes, classifier_fit_samples=real.shape[0] - held,
                                  classifier_heldout_samples=held,
                                  classifier_accuracy=self.classifier.accuracy(real[test], reference.labels[test]))
        if start_step > 0 and self.path.is_file():  # resuming: keep what happened up to the checkpoint
            previous = json.loads(self.path.read_text())
            self.events = [e for e in previous.get("alarms", []) if e["step"] <= start_step]
            self.early_g_norms = previous.get("early_g_norms", [])
        self._save()

    @classmethod
    def for_run(cls, cfg: Config, accelerator: Accelerator, source: BatchSource, run_dir: Path, start_step: int,
                log: RunLogger) -> "Diagnostics | None":
        """The trainer's diagnostics (None when `diag.enabled` is false); the main process reads the real reference."""
        if not cfg.diag.enabled:
            return None
        reference = (real_reference(cfg.data, source, cfg.diag.real_samples) if accelerator.is_main_process
                     else None)
        diagnostics = cls(cfg.diag, reference, run_dir, cfg.model.nz, accelerator.device, start_step)
        if reference is not None:
            log.message(diagnostics.describe())
            log.text("diagnostics/reference", start_step, "```\n" + json.dumps(diagnostics.reference, indent=1) + "\n```")
        return diagnostics

    def due(self, step: int) -> bool:
        """Every `diag.every` steps, and the first step of a run, whose G gradient is the untrained baseline."""
        return step % self.cfg.every == 0 or step == 1

    def describe(self) -> str:
        ref = self.reference
        line = (f"[diagnostics] every {self.cfg.every} steps; real reference: {ref['real_samples']} samples, "
                f"mean MS-SSIM {ref['real_ms_ssim']:.3f}")
        if "classifier_accuracy" in ref:
            line += (f"; mode classifier ({ref['modes']} modes) accuracy {ref['classifier_accuracy']:.3f} on "
                     f"{ref['classifier_heldout_samples']} held-out real samples")
        return line

    def __call__(self, step: int, out: StepOutput, G: nn.Module, log: RunLogger) -> dict[str, float]:
        """One check: measure, log, raise alarms. `G` is the unwrapped generator; returns the values logged."""
        started = time.perf_counter()
        samples = sample_with_batch_statistics(G, self.z)  # every rank: SyncBatchNorm needs them all
        if not self.measuring:
            return {}
        cfg = self.cfg
        norms = {f"grad/G/{k}": v for k, v in out.grad_norms_g.items()}
        norms.update({f"grad/D/{k}": v for k, v in out.grad_norms_d.items()})
        d_fake = torch.sigmoid(out.fake_logits.float()).mean()
        host = torch.stack([*norms.values(), d_fake]).tolist()  # one device-to-host copy
        values = dict(zip(norms, host[:-1]))
        d_fake = host[-1]

        g_norm = values["grad/G/total"]
        learning_early = len(self.early_g_norms) < cfg.reference_checks
        if learning_early:
            self.early_g_norms.append(g_norm)
        g_early = max(self.early_g_norms)  # the largest of the first checks: one already-vanished check cannot lower it
        values["grad/G/relative_to_early"] = g_norm / max(g_early, 1e-12)

        similar = samples[:cfg.similarity_samples]
        pairs = pairwise_ms_ssim(similar)
        ms_ssim = pairs.mean().item()
        real_ms_ssim = self.reference["real_ms_ssim"]
        spread = feature_spread(self.features(samples))
        values.update({
            "diversity/ms_ssim": ms_ssim, "diversity/ms_ssim_real": real_ms_ssim,
            "diversity/distinct": float(distinct_count(pairs, similar.shape[0])),
            "diversity/ratio": (1.0 - ms_ssim) / max(1.0 - real_ms_ssim, 1e-12),
            "diversity/feature_spread": spread,
            "diversity/feature_spread_ratio": spread / max(self.reference["real_feature_spread"], 1e-12),
        })
        coverage = None
        if self.classifier is not None:
            modes = self.classifier.modes
            min_count = max(1, int(cfg.coverage_min_share * cfg.samples / modes))
            present = modes_present(self.classifier.predict(samples), modes, min_count)
            coverage = present / modes
            values.update({"coverage/modes": present, "coverage/fraction": coverage})

        conditions = {
            VANISHING_GRADIENTS: len(self.early_g_norms) >= cfg.reference_checks and vanishing_condition(
                g_norm, g_early, d_fake, ratio=cfg.vanishing_ratio, floor=cfg.vanishing_floor,
                d_fake_max=cfg.vanishing_d_fake),
            MODE_COLLAPSE: step >= cfg.warmup_steps and collapse_condition(
                values["diversity/ratio"], coverage, d_fake, min_diversity_ratio=cfg.collapse_diversity_ratio,
                min_coverage=cfg.collapse_coverage, min_d_fake=cfg.collapse_d_fake),
        }
        evidence = {
            VANISHING_GRADIENTS: ({"grad/G/total": g_norm, "grad/G/early": g_early, "D(G(z))": d_fake},
                                  {"vanishing_ratio": cfg.vanishing_ratio, "vanishing_floor": cfg.vanishing_floor,
                                   "vanishing_d_fake": cfg.vanishing_d_fake,
                                   "vanishing_patience": cfg.vanishing_patience}),
            MODE_COLLAPSE: ({**{k: values[k] for k in ("diversity/ms_ssim", "diversity/ms_ssim_real", "diversity/ratio",
                                                      "coverage/modes", "coverage/fraction") if k in values},
                             "D(G(z))": d_fake},
                            {"collapse_diversity_ratio": cfg.collapse_diversity_ratio,
                             "collapse_coverage": cfg.collapse_coverage, "collapse_d_fake": cfg.collapse_d_fake,
                             "collapse_patience": cfg.collapse_patience, "warmup_steps": cfg.warmup_steps}),
        }
        fired = False
        for name, alarm in self.alarms.items():
            if alarm.update(conditions[name]):
                fired = True
                metrics, thresholds = evidence[name]
                self.events.append({"alarm": name, "step": step, "metrics": metrics, "thresholds": thresholds})
                text = (f"step {step}: {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                        + " (thresholds: " + ", ".join(f"{k} {v}" for k, v in thresholds.items()) + ")")
                log.message(f"[diagnostics] WARNING {text}")
                log.text(f"alarms/{name}", step, text)
            values[f"alarm/{name}"] = float(alarm.active)
        if fired or learning_early:
            self._save()
        values["perf/diag_seconds"] = time.perf_counter() - started
        log.scalars(step, values)
        return values

    def _save(self) -> None:
        record = {"config": asdict(self.cfg), "reference": self.reference, "early_g_norms": self.early_g_norms,
                  "alarms": self.events}
        atomic_write(self.path, json.dumps(record, indent=1))
