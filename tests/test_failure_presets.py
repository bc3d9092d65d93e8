"""The failure presets raise their alarm at test size (ngf=ndf=16, 150 steps) on synthetic faces, two seeds each;
the lab's baseline raises neither. Each preset also raises its alarm on real faces (../shared/celeba-sample).
Sizes and the measured alarm steps: docs/failure_modes.md."""
from __future__ import annotations

import json

import pytest

from dcgan_dist.config import load_config
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.diagnostics import DIAGNOSTICS_JSON
from dcgan_dist.diagnostics.alarms import MODE_COLLAPSE, VANISHING_GRADIENTS
from dcgan_dist.train import train
from conftest import shared_path

TEST_SIZE = ["model.ngf=16", "model.ndf=16", "train.max_steps=150", "train.epochs=20", "diag.every=25",
             "diag.warmup_steps=100", "data.workers=0", "log.images_every=1000", "ckpt.every=1000"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return build_shards(write_synthetic_celeba(root / "celeba", 1000, 10, seed=0), root / "shards", workers=1) \
        and root / "shards"


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    """The 1,200 real CelebA faces of ../shared/celeba-sample, packed as training would read them."""
    root = tmp_path_factory.mktemp("real")
    build_shards(shared_path("celeba-sample"), root, fmt="raw", workers=1, allow_missing=True)
    return root


def alarm_steps(preset: str, shards, tmp_path, seed: int, *extra: str) -> dict[str, list[int]]:
    run_dir = tmp_path / f"{preset}-{seed}"
    cfg = load_config(f"configs/{preset}.yaml", [*TEST_SIZE, f"data.source={shards}", f"run.dir={run_dir}",
                                                  f"run.seed={seed}", *extra])
    train(cfg)
    events = json.loads((run_dir / DIAGNOSTICS_JSON).read_text())["alarms"]
    return {name: [e["step"] for e in events if e["alarm"] == name] for name in (VANISHING_GRADIENTS, MODE_COLLAPSE)}


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
