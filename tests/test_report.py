"""dcgan-report on a real short run: HTML with one polyline point per logged step, embedded grids, the alarms; a PNG page."""
from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from dcgan_dist.config import load_config
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.diagnostics import DIAGNOSTICS_JSON
from dcgan_dist.report import main
from dcgan_dist.train import train

STEPS = 30


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    shards = root / "shards"
    build_shards(write_synthetic_celeba(root / "celeba", 200, 4, seed=0), shards, workers=1)
    run_dir = root / "run"
    cfg = load_config("configs/smoke.yaml", [
        f"data.source={shards}", f"run.dir={run_dir}", "model.ngf=8", "model.ndf=8", "model.nz=16",
        "train.batch_size=16", f"train.max_steps={STEPS}", "train.epochs=10", "log.every=5",
        "log.images_every=10", "diag.every=10", "diag.samples=32", "diag.similarity_samples=16",
        "diag.warmup_steps=0", "data.shuffle_buffer=32"])
    train(cfg)
    return run_dir


def scalar_steps(run_dir, tag: str) -> list[int]:
    """Steps at which `tag` was logged, read with tensorboard's low-level event reader."""
    steps = []
    for path in sorted((run_dir / "tb").glob("events.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    steps.append(event.step)
    return steps


def test_html_report_of_a_real_run(short_run, tmp_path):
    out = tmp_path / "report.html"
    assert main([str(short_run), "--out", str(out), "--grids", "3"]) == 0
    page = out.read_text()
    titles = re.findall(r'font-weight="bold">([^<]+)</text>', page)
    assert "Losses" in titles and "Mean pairwise MS-SSIM (higher: more alike)" in titles
    assert "Mode coverage (fraction of modes)" in titles
    loss_d = re.search(r'<polyline points="([^"]+)"[^>]*><title>loss/D</title>', page)
    assert len(loss_d.group(1).split()) == len(scalar_steps(short_run, "loss/D")) == STEPS // 5
    ms_ssim = re.search(r'<polyline points="([^"]+)"[^>]*><title>diversity/ms_ssim</title>', page)
    assert len(ms_ssim.group(1).split()) == len(scalar_steps(short_run, "diversity/ms_ssim")) == STEPS // 10 + 1  # and step 1
    grids = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(grids) == 3 + 1  # three fixed-noise grids (steps 10, 20, 30) and the real one
    assert all(Image.open(io.BytesIO(base64.b64decode(g))).size[0] == 264 for g in grids)
    alarms = json.loads((short_run / DIAGNOSTICS_JSON).read_text())["alarms"]
    for alarm in alarms:
        assert f"step {alarm['step']}: {alarm['alarm']}" in page
    # every alarm is a dashed vertical line on each chart whose steps it falls within
    assert page.count('stroke-dasharray="5,3"') >= len(alarms)
    assert "real samples" in page
    bare = tmp_path / "bare.html"
    assert main([str(short_run), "--out", str(bare), "--grids", "3", "--no-real-samples"]) == 0
    page = bare.read_text()
    assert "real samples" not in page and len(re.findall(r"src='data:image/png;base64,", page)) == 3


def test_png_report_and_errors(short_run, tmp_path, capsys):
    out = tmp_path / "report.png"
    assert main([str(short_run), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width == 2 * 560 + 3 * 12 and image.height > 1000
    assert not list(tmp_path.glob("*.tmp"))
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no TensorBoard events" in capsys.readouterr().err
    assert main([str(short_run), "--out", str(tmp_path / "x.pdf")]) == 2
    assert "expected a file name ending in .html or .png" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
