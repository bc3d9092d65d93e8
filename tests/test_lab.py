"""The lab as a student runs it: the step budget, the demo's data that the lab's DCGAN learns (and the
old flat cartoons that it does not), and launch/lab.sh's one comparison page."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcgan_dist.checkpoint import latest_checkpoint
from dcgan_dist.config import load_config
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.train import total_steps, train

REPO = Path(__file__).resolve().parents[1]

TINY = ["model.ngf=8", "model.ndf=8", "model.nz=16", "train.batch_size=8", "data.workers=0", "log.every=5",
        "log.images_every=100", "ckpt.every=100", "diag.enabled=false"]


DEMO_STEPS = 400  # at the demo's settings (width 32, batch 64) on 2,000 faces: about 2 minutes on 2 cores


def last_check(run_dir: Path) -> dict[str, float]:
    """The diagnostics' values at the run's last check, read back from its TensorBoard events."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]
            if tag.startswith(("coverage/", "diversity/", "alarm/"))}


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> dict[str, Path]:
    """The demo's settings (configs/smoke.yaml) for DEMO_STEPS on 2,000 faces of each style, trained once."""
    runs = {}
    for style in ("photo", "flat"):
        root = tmp_path_factory.mktemp(style)
        shards = root / "shards"
        build_shards(write_synthetic_celeba(root / "celeba", 2000, 10, seed=0, style=style), shards, workers=1)
        runs[style] = root / "run"
        train(load_config(REPO / "configs/smoke.yaml", [
            f"data.source={shards}", f"run.dir={runs[style]}", f"train.max_steps={DEMO_STEPS}", "diag.every=50",
            "data.workers=0", "log.images_every=1000", "ckpt.every=1000"]))
    return runs


@pytest.mark.parametrize("style", ["photo", pytest.param("flat", marks=pytest.mark.xfail(
    strict=True, reason="the old flat cartoons: D wins at once and G never makes varied faces"))])
def test_the_demo_learns_the_photo_faces_and_not_the_flat_cartoons(demo_runs, style):
    # measured at step 400 (one CPU thread): photo 3 modes, 34 distinct samples of 64, diversity ratio 0.57;
    # flat 1 mode, 1 distinct, 0.014 (D(G(z)) 0.002). The thresholds leave room for the run-to-run spread
    # of a young GAN (the photo run had 5 modes and 22 distinct at step 300)
    values = last_check(demo_runs[style])
    assert values["coverage/modes"] >= 2 and values["diversity/distinct"] >= 16 and values["diversity/ratio"] >= 0.35
    assert values["alarm/mode_collapse"] == values["alarm/vanishing_gradients"] == 0


def layout_correlation(images: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each image's correlation with the average real face, both as 16x16 grey layouts: about 0 for noise,
    0.2-0.3 for real faces and for G's faces (it says "not noise", not "a face")."""
    def grey(x: torch.Tensor) -> torch.Tensor:
        layout = torch.nn.functional.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 16).flatten(1)
        return layout - layout.mean(1, keepdim=True)

    mean_face = grey(real.float().mean(0, keepdim=True))[0]
    return grey(images) @ mean_face / (grey(images).norm(dim=1) * mean_face.norm() + 1e-8)


def test_the_collapse_preset_turns_the_demo_faces_into_near_copies_of_one_face(demo_runs, tmp_path):
    from PIL import Image
    from torchvision import transforms

    from dcgan_dist.checkpoint import load_generator

    healthy, run = demo_runs["photo"], tmp_path / "collapse"
    train(load_config(REPO / "configs/mode_collapse.yaml", [
        f"data.source={healthy.parent / 'shards'}", f"run.dir={run}", f"run.init_from={healthy}",
        f"train.max_steps={DEMO_STEPS + 100}", "data.workers=0", "log.images_every=1000", "ckpt.every=1000"]))
    values = last_check(run)
    assert values["diversity/distinct"] <= 4 and values["alarm/mode_collapse"] == 1  # a handful of images of 64

    to_64 = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor()])
    files = sorted((healthy.parent / "celeba" / "img_align_celeba").glob("*.jpg"))[:512]
    real = torch.stack([to_64(Image.open(f).convert("RGB")) for f in files]) * 2 - 1
    z = torch.randn(64, 100, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        collapsed = load_generator(run / "generator_raw.safetensors").train()(z)
        faces = load_generator(healthy / "generator_raw.safetensors").train()(z)
    noise = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # measured: collapsed 0.35, the healthy G's faces 0.27, real faces 0.27, noise 0.003
    assert layout_correlation(collapsed, real).mean() > 0.1 > layout_correlation(noise, real).mean()
    assert layout_correlation(faces, real).mean() > 0.1


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
