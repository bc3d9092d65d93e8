"""dcgan-report --compare on real short runs: every run named, a column of grids per run at the steps they share,
one sentence per run, each alarm with its run's name, colour and step; the PNG page; runs that are not runs.

Also the pieces the pages are made of: layer names against the torch modules, axis ticks read back as numbers.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil

import pytest
from PIL import Image
from torch import nn

from dcgan_dist.diagnostics import DIAGNOSTICS_JSON
from dcgan_dist.diagnostics.alarms import MODE_COLLAPSE, VANISHING_GRADIENTS
from dcgan_dist.imaging import font
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.report import CHART_W, PANELS, axis_ticks, layer_names, layout, load_run, main, short_number
from test_report import grid_images, last_scalar, make_run, synthetic_shards

# the alarms written into copies of the runs, in the format dcgan_dist/diagnostics/monitor.py records
COLLAPSE_AT, VANISH_AT = 20, 10
G_NORM, G_EARLY, D_FAKE = 0.05, 16.0, 0.0004


def add_alarm(run_dir, alarm: str, step: int, metrics: dict) -> None:
    path = run_dir / DIAGNOSTICS_JSON
    record = json.loads(path.read_text())
    record["alarms"].append({"alarm": alarm, "step": step, "metrics": metrics,
                             "thresholds": {"collapse_patience": 2} if alarm == MODE_COLLAPSE else
                             {"vanishing_patience": 3}})
    path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """healthy (non-saturating, no alarm), collapse (its copy with a mode_collapse alarm), vanishing (a minimax
    run with a vanishing_gradients alarm). No warm-up passes in 30 steps, so the trained runs raise no alarm."""
    root = tmp_path_factory.mktemp("compare")
    shards = synthetic_shards(root)
    healthy = make_run(shards, root / "healthy", "diag.warmup_steps=1000")
    vanishing = make_run(shards, root / "vanishing", "diag.warmup_steps=1000", "loss.generator=minimax",
                         "optim.lr_d=0.001")
    for run in (healthy, vanishing):
        assert json.loads((run / DIAGNOSTICS_JSON).read_text())["alarms"] == []
    collapse = root / "collapse"
    shutil.copytree(healthy, collapse)
    add_alarm(collapse, MODE_COLLAPSE, COLLAPSE_AT, {"diversity/ms_ssim": 0.98, "diversity/ms_ssim_real": 0.26,
                                                     "diversity/ratio": 0.027, "coverage/modes": 1,
                                                     "coverage/fraction": 0.25, "D(G(z))": 0.96})
    add_alarm(vanishing, VANISHING_GRADIENTS, VANISH_AT, {"grad/G/total": G_NORM, "grad/G/early": G_EARLY,
                                                          "D(G(z))": D_FAKE})
    return {"healthy": healthy, "collapse": collapse, "vanishing": vanishing}


def grid_table(page: str) -> tuple[list[str], list[tuple[str, list[bytes]]]]:
    """The compare page's grid table: the runs' names over the columns, then (row label, grids) per row."""
    table = re.search(r"<table class='grids'>(.*?)</table>", page, re.S).group(1)
    header, *rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)
    names = [html.unescape(n) for n in re.findall(r"<th[^>]*>([^<]+)</th>", header)]
    return names, [(re.search(r"<th>([^<]+)</th>", row).group(1),
                    [base64.b64decode(g) for g in re.findall(r"<img src='data:image/png;base64,([^']+)'", row)])
                   for row in rows]


def test_compare_html(runs, tmp_path):
    out = tmp_path / "compare.html"
    dirs = [str(runs[name]) for name in ("healthy", "collapse", "vanishing")]
    assert main(["--compare", *dirs, "--out", str(out), "--grids", "2"]) == 0
    page = out.read_text()
    names, rows = grid_table(page)
    assert names == ["healthy", "collapse", "vanishing"]
    # two grids asked for: the first and last of the steps every run logged one at, one column per run in order
    logged = [grid_images(runs[name]) for name in names]
    common = sorted(set(logged[0]) & set(logged[1]) & set(logged[2]))
    assert common == [10, 20, 30]
    assert [label for label, _ in rows] == ["step 10", "step 30"]
    for (label, grids), step in zip(rows, (10, 30)):
        assert grids == [images[step] for images in logged]

    sentences = [html.unescape(s) for s in re.findall(r"<li class='sentence'><span[^>]*></span>([^<]+)</li>", page)]
    assert [s.split(":")[0] for s in sentences] == names
    healthy, collapse, vanishing = sentences
    final_dx = last_scalar(runs["healthy"], "D(x)")
    assert healthy.startswith(f"healthy: no alarm fired; final D(x) {final_dx:.2f}, D(G(z)) ")
    assert collapse.startswith(f"collapse: mode_collapse alarm from step {COLLAPSE_AT} (diversity 0.03 of real, "
                               "1 of 4 modes) while D(G(z)) was 0.96;")
    assert vanishing.startswith(f"vanishing: vanishing_gradients alarm from step {VANISH_AT}: G's gradient fell to "
                                f"{G_NORM / G_EARLY:.2g} of its early value while D(G(z)) was {D_FAKE:g};")

    # each alarm is a dashed line on every chart, in its run's colour (that of the run's column heading),
    # labelled with the alarm's name and, on hover, the run's name and the step
    colours = dict((html.unescape(n), c) for c, n in re.findall(r"<th style='color:(#[0-9a-f]{6})'>([^<]+)</th>",
                                                                 re.search(r"<table class='grids'>.*?</tr>", page,
                                                                           re.S).group(0)))
    charts = re.findall(r"<svg.*?</svg>", page)
    assert len(charts) == len([p for p in PANELS if not p.prefix])  # per-layer panels: in each run's own report
    for run, alarm, step in (("collapse", MODE_COLLAPSE, COLLAPSE_AT), ("vanishing", VANISHING_GRADIENTS, VANISH_AT)):
        marks = re.findall(r'<line class="alarm"[^>]* stroke="([^"]+)"[^>]*><title>' + f"{run}: {alarm} at step {step}"
                           + r"</title></line><text[^>]*>([^<]+)</text>", page)
        assert marks == [(colours[run], alarm)] * len(charts)
    assert "healthy: " not in "".join(re.findall(r'<line class="alarm".*?</line>', page))
    assert "real samples" in page


def test_compare_labels_png_and_no_real_samples(runs, tmp_path):
    out = tmp_path / "compare.html"
    dirs = [str(runs[name]) for name in ("healthy", "vanishing")]
    assert main(["--compare", *dirs, "--labels", "non-saturating,minimax", "--out", str(out),
                 "--no-real-samples"]) == 0
    page = out.read_text()
    names, rows = grid_table(page)
    assert names == ["non-saturating", "minimax"] and [label for label, _ in rows] == ["step 10", "step 20", "step 30"]
    assert all(len(grids) == 2 for _, grids in rows) and "real samples" not in page
    assert len(re.findall(r"<li class='sentence'>", page)) == 2
    assert "minimax: vanishing_gradients alarm" in page

    png = tmp_path / "compare.png"
    assert main(["--compare", *dirs, "--out", str(png)]) == 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width == 2 * CHART_W + 3 * 12 and image.height > 1500
    # more runs than two charts are wide: the page widens to a 264 px column per run beside the row labels
    wide = tmp_path / "wide.png"
    assert main(["--compare", *dirs, *dirs, dirs[0], "--labels", "a,b,c,d,e", "--out", str(wide)]) == 0
    with Image.open(wide) as image:
        assert image.width == 90 + 5 * (264 + 12) + 12


def test_compare_rejects_a_folder_that_is_not_a_run(runs, tmp_path, capsys):
    out = tmp_path / "compare.html"
    stray = tmp_path / "notes"
    stray.mkdir()
    assert main(["--compare", str(runs["healthy"]), str(stray), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(stray) in err[0] and "not a run folder" in err[0]
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(SystemExit) as exc:
        main(["--compare", str(runs["healthy"]), str(runs["collapse"]), "--labels", "only-one", "--out", str(out)])
    assert exc.value.code == 2


def test_single_run_page_without_alarms_is_not_red(runs, tmp_path):
    out = tmp_path / "healthy.html"
    assert main([str(runs["healthy"]), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<li class='ok'>no alarm fired</li>" in page and "<li class='alarm'>" not in page
    assert ".ok{color:#1a7f37}" in page  # green, not the alarms' red


def test_layer_names_match_the_modules_of_the_model():
    config = {"model": {"nz": 100, "ngf": 64, "ndf": 32, "channels": 3}}
    names = layer_names(config)
    G, D = Generator(100, 64, 3), Discriminator(32, 3)
    for side, net in (("G", G), ("D", D)):
        convs = [(i, m) for i, m in enumerate(net.main) if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        kind = "convT" if side == "G" else "conv"
        for k, (index, module) in enumerate(convs, start=1):  # the gradient tags name the module by its index
            assert names[f"grad/{side}/{index}"] == f"{kind}{k} ({module.in_channels}->{module.out_channels})"
        norms = [(i, m) for i, m in enumerate(net.main) if isinstance(m, nn.BatchNorm2d)]
        for index, module in norms:
            assert names[f"grad/{side}/{index}"] == f"bn{sum(i < index for i, _ in convs)} ({module.num_features})"
        assert sorted(k for k in names if k.startswith(f"grad/{side}/")) == sorted(
            f"grad/{side}/{i}" for i, _ in convs + norms)
    assert names["grad/G/0"] == "convT1 (100->512)" and names["grad/G/12"] == "convT5 (64->3)"
    assert names["grad/D/0"] == "conv1 (3->32)" and names["grad/D/11"] == "conv5 (256->1)"
    assert layer_names({}) == {}


def test_the_per_layer_tags_of_a_real_run_all_have_names(runs):
    run = load_run(runs["healthy"])
    per_layer = [t for t in run.scalars if re.fullmatch(r"grad/[GD]/\d+", t)]
    names = layer_names(run.config)
    assert len(per_layer) == 9 + 8 and set(per_layer) == set(names)


def test_linear_ticks_are_round_numbers_read_back():
    ticks = axis_ticks(0.00123, 0.0456)
    assert [float(label) for _, label in ticks] == [0.01, 0.02, 0.03, 0.04]
    assert [label for _, label in ticks] == ["0.01", "0.02", "0.03", "0.04"]
    assert all(math.isclose(v, float(label)) for v, label in ticks)
    assert [label for _, label in axis_ticks(0.0, 1.0)] == ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert [label for _, label in axis_ticks(-0.3, 2.6)] == ["0", "0.5", "1.0", "1.5", "2.0", "2.5"]
    assert [float(label) for _, label in axis_ticks(0, 25_000)] == [0, 5000, 10000, 15000, 20000, 25000]
    tiny = axis_ticks(1.2e-6, 4.9e-6)
    assert [label for _, label in tiny] == ["2e-6", "3e-6", "4e-6"]
    assert all(math.isclose(v, float(label)) for v, label in tiny)
    assert [label for _, label in axis_ticks(0.5, 0.5)] == ["0.5"]
    # numbers in sentences and summaries: two decimals, two significant digits when small, short exponents
    assert [short_number(v) for v in (0.713, 12.345, 0.0031, 0.0004, 2.1e-5, 0.0)] == [
        "0.71", "12.35", "0.0031", "0.0004", "2.1e-5", "0.00"]


def test_log_ticks_are_decades_read_back():
    ticks = axis_ticks(1e-5, 3.0, log=True)
    assert [label for _, label in ticks] == ["1e-5", "0.0001", "0.001", "0.01", "0.1", "1"]
    assert [math.log10(float(label)) for _, label in ticks] == [-5, -4, -3, -2, -1, 0]
    wide = [float(label) for _, label in axis_ticks(2e-10, 5e3, log=True)]
    exponents = [math.log10(v) for v in wide]
    assert len(wide) <= 6 and all(e == round(e) for e in exponents)
    assert len({b - a for a, b in zip(exponents, exponents[1:])}) == 1  # every k-th decade, evenly
    assert [float(label) for _, label in axis_ticks(0.3, 4.0, log=True)] == [0.5, 1, 2]  # under two decades: 1-2-5
    assert all("e-0" not in label and "e+" not in label for _, label in axis_ticks(1e-12, 1e9, log=True))


def test_x_tick_labels_do_not_overlap(runs):
    """Measured with PIL's font, the x labels of a long run's chart leave room between them at CHART_W."""
    run = load_run(runs["healthy"])
    run.scalars["loss/D"] = [(step, 1.0) for step in range(0, 123_457, 1000)]
    chart = layout(PANELS[0], run)
    f = font(11)
    xs = [(x, f.getlength(label)) for x, label in chart.xticks]
    assert len(xs) >= 3 and all(b - a >= (wa + wb) / 2 + 4 for (a, wa), (b, wb) in zip(xs, xs[1:]))
    assert all(0 <= x <= CHART_W for x, _ in xs)
    ys = [y for y, _ in chart.yticks]
    assert len(ys) >= 2 and all(b - a >= 12 for a, b in zip(ys[::-1], ys[::-1][1:]))
