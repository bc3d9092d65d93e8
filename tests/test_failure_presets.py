"""The failure presets raise their alarm at test size (ngf=ndf=16, 150 steps) on synthetic faces, two seeds each;
the lab's baseline raises neither. The collapse preset starts from the baseline's checkpoint at half the budget,
as launch/lab.sh runs it. Each preset also raises its alarm on real faces (../shared/celeba-sample).
Sizes and the measured alarm steps: docs/failure_modes.md."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dcgan_dist.config import load_config
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.diagnostics import DIAGNOSTICS_JSON
from dcgan_dist.diagnostics.alarms import MODE_COLLAPSE, VANISHING_GRADIENTS
from dcgan_dist.train import train
from conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
TEST_SIZE = ["model.ngf=16", "model.ndf=16", "train.max_steps=150", "train.epochs=20", "diag.every=25",
             "diag.warmup_steps=100", "data.workers=0", "log.images_every=1000", "ckpt.every=75", "ckpt.keep=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return build_shards(write_synthetic_celeba(root / "celeba", 1000, 10, seed=0, style="flat"), root / "shards", workers=1) \
        and root / "shards"


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    """The 1,200 real CelebA faces of ../shared/celeba-sample, packed as training would read them."""
    root = tmp_path_factory.mktemp("real")
    build_shards(shared_path("celeba-sample"), root, fmt="raw", workers=1, allow_missing=True)
    return root


HALF = "step-00000075"  # the baseline's checkpoint the collapse preset starts from


def alarm_steps(preset: str, shards, tmp_path, seed: int, *extra: str) -> dict[str, list[int]]:
    """Train `preset` at test size and return the steps each alarm fired at. The collapse preset first needs
    the baseline's run, which is trained here (with a checkpoint at half the budget) unless it exists."""
    run_dir = tmp_path / f"{preset}-{seed}"
    if preset == "mode_collapse":
        healthy = tmp_path / f"smoke-{seed}"
        if not (healthy / "checkpoints" / HALF).is_dir():
            alarm_steps("smoke", shards, tmp_path, seed, *extra)
        extra = (*extra, f"run.init_from={healthy / 'checkpoints' / HALF}")
    cfg = load_config(f"configs/{preset}.yaml", [*TEST_SIZE, f"data.source={shards}", f"run.dir={run_dir}",
                                                  f"run.seed={seed}", *extra])
    train(cfg)
    events = json.loads((run_dir / DIAGNOSTICS_JSON).read_text())["alarms"]
    return {name: [e["step"] for e in events if e["alarm"] == name] for name in (VANISHING_GRADIENTS, MODE_COLLAPSE)}


def test_presets_parse_and_each_failure_preset_changes_what_causes_its_failure():
    presets = {p.stem: load_config(p) for p in sorted(REPO.glob("configs/*.yaml"))}
    assert set(presets) == {"celeba64", "smoke", "vanishing_gradients", "vanishing_gradients_non_saturating",
                            "mode_collapse"}
    lab, baseline = presets["celeba64"], presets["smoke"]
    defaults = load_config(None)
    # the lab's recipe: equal Adam rates, the non-saturating loss, the full widths
    assert (lab.optim.lr_g, lab.optim.lr_d, lab.loss.generator) == (2e-4, 2e-4, "non_saturating")
    assert (lab.model.ngf, lab.model.ndf, lab.train.batch_size) == (64, 64, 128)
    assert (baseline.optim, baseline.loss) == (lab.optim, lab.loss)  # the demo only shrinks the run
    vanishing, collapse = presets["vanishing_gradients"], presets["mode_collapse"]
    twin = presets["vanishing_gradients_non_saturating"]  # the controlled experiment: only the loss differs
    assert dataclasses.replace(twin, run=vanishing.run, loss=vanishing.loss) == vanishing
    assert (twin.loss.generator, twin.run.seed) == ("non_saturating", vanishing.run.seed)
    # vanishing gradients: the saturating minimax loss, against a D faster than G
    assert vanishing.loss.generator == "minimax" and vanishing.optim.lr_d > vanishing.optim.lr_g
    # mode collapse: from the healthy demo run, the non-saturating loss kept, G updated 5 times per D update
    # and D four times slower than G
    assert collapse.loss.generator == "non_saturating" and collapse.run.init_from == baseline.run.dir
    assert collapse.optim.lr_g == baseline.optim.lr_g and collapse.optim.lr_d * 4 == pytest.approx(collapse.optim.lr_g)
    assert (collapse.train.g_steps, baseline.train.g_steps) == (5, 1)
    assert collapse.train.max_steps == baseline.train.max_steps + 300
    for failure in (vanishing, collapse):
        # the same data and size as the baseline, and the default alarm thresholds: only the recipe differs
        assert (failure.data, failure.model, failure.precision) == (baseline.data, baseline.model, baseline.precision)
        assert failure.diag.every == 25 and dataclasses.replace(failure.diag, every=defaults.diag.every) == defaults.diag
        assert failure.diag.enabled


@pytest.mark.parametrize("seed", [0, 1])
def test_vanishing_preset_raises_vanishing_gradients(shards, tmp_path, seed):
    assert alarm_steps("vanishing_gradients", shards, tmp_path, seed)[VANISHING_GRADIENTS]


@pytest.mark.parametrize("seed", [0, 1])
def test_baseline_raises_no_alarm(shards, tmp_path, seed):
    assert alarm_steps("smoke", shards, tmp_path, seed) == {VANISHING_GRADIENTS: [], MODE_COLLAPSE: []}


@pytest.mark.parametrize("seed", [0, 1])
def test_collapse_preset_raises_mode_collapse(shards, tmp_path, seed):
    assert alarm_steps("mode_collapse", shards, tmp_path, seed)[MODE_COLLAPSE]


@pytest.mark.parametrize("preset, alarm", [("vanishing_gradients", VANISHING_GRADIENTS), ("mode_collapse", MODE_COLLAPSE)])
def test_preset_raises_its_alarm_on_real_faces(real_shards, tmp_path, preset, alarm):
    # 768 real reference samples: the 1,080 training images of the sample hold no 1,536
    assert alarm_steps(preset, real_shards, tmp_path, 0, "diag.real_samples=768")[alarm]
