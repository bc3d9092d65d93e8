"""The lab as a student runs it: the step budget, the demo's data that the lab's DCGAN learns (and the
old flat cartoons that it does not), and launch/lab.sh's one comparison page."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from dcgan_dist.checkpoint import latest_checkpoint
from dcgan_dist.config import load_config
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.train import total_steps, train

REPO = Path(__file__).resolve().parents[1]

TINY = ["model.ngf=8", "model.ndf=8", "model.nz=16", "train.batch_size=8", "data.workers=0", "log.every=5",
        "log.images_every=100", "ckpt.every=100", "diag.enabled=false"]


def test_max_steps_is_the_budget_beyond_the_epochs(tmp_path, image_folder):
    cfg = load_config(None, ["train.epochs=5", "train.max_steps=400"])
    assert total_steps(cfg, batches_per_epoch=52) == 400  # 5 epochs would be 260
    assert total_steps(load_config(None, ["train.epochs=5"]), batches_per_epoch=52) == 260
    # 96 images in batches of 8: 12 steps an epoch; a budget of 20 goes on into a second epoch
    train(load_config(None, [*TINY, f"data.source={image_folder}", f"run.dir={tmp_path}", "train.epochs=1",
                             "train.max_steps=20"]))
    state = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (20, 1, 8)


def test_presets_ask_for_no_more_loader_workers_than_a_two_core_laptop_has():
    for preset in sorted(REPO.glob("configs/*.yaml")):
        assert load_config(preset).data.workers <= 2, preset.name


def test_lab_script_runs_every_experiment_on_the_same_data_and_writes_one_comparison_page(tmp_path):
    shards = tmp_path / "shards"
    build_shards(write_synthetic_celeba(tmp_path / "celeba", 160, 4, seed=0), shards, workers=1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    tiny = ["model.ngf=8", "model.ndf=8", "train.batch_size=16", "train.max_steps=4", "log.every=2",
            "diag.enabled=false"]  # the smallest runs: the page, not the training, is under test
    out = tmp_path / "lab"
    proc = subprocess.run(["bash", str(REPO / "launch/lab.sh"), str(shards), "--size", "test", "--out", str(out),
                           "--", *tiny], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"[lab] comparison page: {out}/compare.html"
    page = (out / "compare.html").read_text()
    runs = {"healthy": "smoke", "mode_collapse": "mode_collapse", "vanishing_minimax": "vanishing_gradients",
            "vanishing_non_saturating": "vanishing_gradients_non_saturating"}
    for label, preset in runs.items():
        assert label in page
        used = yaml.safe_load((out / label / "config.yaml").read_text())
        wanted = load_config(REPO / "configs" / f"{preset}.yaml")
        assert (used["data"]["source"], used["train"]["max_steps"], used["model"]["ngf"]) == (str(shards), 4, 8)
        assert (used["loss"], used["optim"]["lr_d"]) == (dataclasses.asdict(wanted.loss), wanted.optim.lr_d)
    assert subprocess.run(["bash", str(REPO / "launch/lab.sh"), "--size", "huge"], env=env, capture_output=True,
                          text=True).stderr.strip() == "lab.sh: --size: got 'huge', expected cpu, test or gpu"
