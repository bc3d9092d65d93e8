"""dcgan-report on a real short run: HTML with one polyline point per logged step, full-resolution grids, the
alarms, a summary read from the run's files, layer names on the per-layer gradient panels; a PNG page.

`make_run` and the event readers here are shared with test_report_compare.py."""
from __future__ import annotations

import base64
import html
import io
import json
import re

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from torch import nn

from dcgan_dist.config import load_config
from dcgan_dist.data.build.pack import build_shards
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.diagnostics import DIAGNOSTICS_JSON
from dcgan_dist.diagnostics.alarms import MODE_COLLAPSE
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.report import main
from dcgan_dist.train import train

STEPS = 30
NZ, NGF, NDF = 16, 8, 8


def synthetic_shards(root):
    shards = root / "shards"
    build_shards(write_synthetic_celeba(root / "celeba", 200, 4, seed=0), shards, workers=1)
    return shards


def make_run(shards, run_dir, *overrides: str):
    """A real 30-step run of a tiny model: loss and D values every 5 steps, grids and diagnostics every 10."""
    cfg = load_config("configs/smoke.yaml", [
        f"data.source={shards}", f"run.dir={run_dir}", f"model.ngf={NGF}", f"model.ndf={NDF}", f"model.nz={NZ}",
        "train.batch_size=16", f"train.max_steps={STEPS}", "train.epochs=10", "log.every=5",
        "log.images_every=10", "diag.every=10", "diag.samples=32", "diag.similarity_samples=16",
        "data.shuffle_buffer=32", *overrides])
    train(cfg)
    return run_dir


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return make_run(synthetic_shards(root), root / "run", "diag.warmup_steps=0")


def events(run_dir):
    """Every summary value of the run with its event's step and wall time, as written (tensorboard's raw reader)."""
    for path in sorted((run_dir / "tb").glob("events.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                yield event.step, event.wall_time, value


def scalar_steps(run_dir, tag: str) -> list[int]:
    """Steps at which `tag` was logged."""
    return [step for step, _, value in events(run_dir) if value.tag == tag]


def last_scalar(run_dir, tag: str) -> float:
    return [value.simple_value for _, _, value in events(run_dir) if value.tag == tag][-1]


def grid_images(run_dir, tag: str = "images/fake_fixed_noise") -> dict[int, bytes]:
    """step -> the PNG of the grid logged under `tag`."""
    return {step: value.image.encoded_image_string for step, _, value in events(run_dir) if value.tag == tag}


def svg_of(page: str, title: str) -> str:
    return re.search(r'<svg[^>]*>(?:(?!</svg>).)*font-weight="bold">' + re.escape(title) + r"<.*?</svg>", page).group(0)


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
    grids = [base64.b64decode(g) for g in re.findall(r"src='data:image/png;base64,([^']+)'", page)]
    # the three fixed-noise grids (steps 10, 20, 30) and the real one, at full resolution, shown 264 px wide
    logged = grid_images(short_run)
    assert sorted(logged) == [10, 20, 30]
    assert grids == [logged[10], logged[20], logged[30], grid_images(short_run, "images/real")[0]]
    assert Image.open(io.BytesIO(grids[0])).width > 264 and ".zoom img{display:block;width:264px" in page
    alarms = json.loads((short_run / DIAGNOSTICS_JSON).read_text())["alarms"]
    # no warm-up: the untrained G's alike samples raise mode_collapse, so the page has an alarm to show
    assert MODE_COLLAPSE in {alarm["alarm"] for alarm in alarms}, alarms
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


def test_summary_and_layer_names_of_a_real_run(short_run, tmp_path):
    out = tmp_path / "report.html"
    assert main([str(short_run), "--out", str(out)]) == 0
    page = out.read_text()
    summary = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]+)</td></tr>", page))
    cfg = yaml.safe_load((short_run / "config.yaml").read_text())
    assert summary["data"] == "shards (synthetic, 4 modes)"  # the source's base name; its modes from diagnostics
    assert summary["model"] == f"nz {cfg['model']['nz']}, ngf {cfg['model']['ngf']}, ndf {cfg['model']['ndf']}"
    assert summary["batch"] == f"{cfg['train']['batch_size']} per process"
    assert summary["learning rates"] == "lr_g 0.0002, lr_d 0.0002" and cfg["optim"]["lr_g"] == 2e-4
    assert summary["G loss"] == cfg["loss"]["generator"] and summary["precision"] == cfg["precision"]
    assert summary["steps"] == str(STEPS)
    times = [t for _, t, value in events(short_run) if value.tag in ("loss/D", "images/fake_fixed_noise")]
    seconds = int(re.fullmatch(r"(\d+) s \(first to last event\)", summary["duration"]).group(1))
    assert abs(seconds - (max(times) - min(times))) <= 1
    final = dict(item.rsplit(" ", 1) for item in summary["final values"].removesuffix(f" (step {STEPS})").split(", "))
    assert float(final["D(x)"]) == pytest.approx(last_scalar(short_run, "D(x)"), abs=0.005)
    assert float(final["loss/G"]) == pytest.approx(last_scalar(short_run, "loss/G"), abs=0.005)
    # an alarm fired: the alarm lines are red; the sentence says which and when
    assert re.search(r"<li class='alarm'>step \d+: mode_collapse", page) and "class='ok'" not in page
    assert re.search(r"<p class='sentence'>run: mode_collapse alarm from step \d+", page)

    # per-layer panels: one line per layer, named after the conv / BatchNorm modules of the run's G and D
    G, D = Generator(NZ, NGF), Discriminator(NDF)
    for side, net in (("G", G), ("D", D)):
        expected, convs = [], 0
        for module in net.main:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                convs += 1
                kind = "convT" if isinstance(module, nn.ConvTranspose2d) else "conv"
                expected.append(f"{kind}{convs} ({module.in_channels}->{module.out_channels})")
            elif isinstance(module, nn.BatchNorm2d):
                expected.append(f"bn{convs} ({module.num_features})")
        chart = svg_of(page, f"{side} gradient norm per layer (log)")
        assert [html.unescape(t) for t in re.findall(r'class="legend"[^>]*>([^<]+)<', chart)] == expected
        assert [html.unescape(t) for t in re.findall(r"<title>([^<]+)</title></polyline>", chart)] == expected
    assert expected[0] == f"conv1 (3->{NDF})" and expected[-1] == f"conv5 ({NDF * 8}->1)"
