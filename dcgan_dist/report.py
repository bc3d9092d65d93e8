"""dcgan-report: one page (HTML or PNG) about a run, or comparing runs, for people who cannot open TensorBoard.

    dcgan-report runs/smoke --out smoke.html
    dcgan-report runs/smoke --out smoke.png
    dcgan-report --compare runs/smoke runs/mode_collapse runs/vanishing_gradients --out compare.html

Reads each run's TensorBoard events (tensorboard's EventAccumulator), RUN/config.yaml and
RUN/diagnostics.json. A run's page starts with its settings, duration, final values and a sentence
saying what happened, then draws losses, D's outputs, gradient norms (per layer, by layer name),
diversity and coverage with the alarms marked on every curve, then the fixed-noise sample grids
over time. A comparison page overlays the runs' curves (one colour per run), puts their sample
grids side by side at the steps they share and says in one sentence per run what happened.
HTML gets inline SVG charts and full-resolution PNG grids shown small (click one to enlarge it);
PNG is composed with PIL. No plotting library is needed.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from dcgan_dist.diagnostics import DIAGNOSTICS_JSON
from dcgan_dist.diagnostics.alarms import MODE_COLLAPSE, VANISHING_GRADIENTS
from dcgan_dist.errors import first_line
from dcgan_dist.fileio import atomic_path, atomic_write

GRID_TAG = "images/fake_fixed_noise"
REAL_GRID_TAG = "images/real"
CONFIG_YAML = "config.yaml"  # written into the run folder by dcgan-train
CHART_W, CHART_H = 560, 230  # CHART_H: a chart whose legend fits on one line
LEFT, RIGHT, TOP = 64, 12, 30
PLOT_H = 156  # height of the plotting area, below TOP
LEGEND_ROW = 14
CHAR_W = 6.5  # estimated width of a character at the charts' 11 px font (SVG cannot measure text)
GRID_PX = 264  # sample grids are shown this wide (HTML: until clicked; PNG: in a comparison)
PAD = 12  # between the PNG page's blocks
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#d62728")
DASHES = ("", "7,3", "2,2", "9,3,2,3")  # SVG dash patterns: a comparison tells a panel's tags apart by these
ALARM_COLOURS = {VANISHING_GRADIENTS: "#d62728", MODE_COLLAPSE: "#9400d3"}
ALARM_RED, OK_GREEN, NEUTRAL = "#b00000", "#1a7f37", "#555555"
# The values a summary states at the end of a run: tag, and the name shown for it.
FINAL_VALUES = (("loss/D", "loss/D"), ("loss/G", "loss/G"), ("D(x)", "D(x)"), ("D(G(z))/before_D_step", "D(G(z))"),
                ("diversity/ratio", "diversity ratio"), ("coverage/fraction", "mode coverage"),
                ("grad/G/relative_to_early", "G gradient / early"))


@dataclass(frozen=True)
class Panel:
    title: str
    tags: tuple[str, ...] = ()
    prefix: str = ""  # also every tag under this prefix, except `tags` listed elsewhere (per-layer panels)
    exclude: tuple[str, ...] = ()
    log: bool = False
    threshold: str = ""  # a diag config key drawn as a horizontal line


PANELS = (
    Panel("Losses", ("loss/D", "loss/G")),
    Panel("D outputs (probabilities, running means)", ("D(x)", "D(G(z))/before_D_step", "D(G(z))/after_D_step")),
    Panel("Fraction of positive D logits", ("D/positive_logits_real", "D/positive_logits_fake")),
    Panel("Total gradient norms (log)", ("grad/G/total", "grad/D/total"), log=True),
    Panel("G gradient norm / its early value (log)", ("grad/G/relative_to_early",), log=True,
          threshold="vanishing_ratio"),
    Panel("G gradient norm per layer (log)", prefix="grad/G/", exclude=("grad/G/total", "grad/G/relative_to_early"),
          log=True),
    Panel("D gradient norm per layer (log)", prefix="grad/D/", exclude=("grad/D/total",), log=True),
    Panel("Mean pairwise MS-SSIM (higher: more alike)", ("diversity/ms_ssim", "diversity/ms_ssim_real")),
    Panel("Diversity, generated / real", ("diversity/ratio", "diversity/feature_spread_ratio"),
          threshold="collapse_diversity_ratio"),
    Panel("Mode coverage (fraction of modes)", ("coverage/fraction",), threshold="collapse_coverage"),
)


class ReportError(ValueError):
    """A run directory or output path that cannot make a report (one line)."""


@dataclass
class RunData:
    scalars: dict[str, list[tuple[int, float]]]
    grids: list[tuple[int, bytes]]  # (step, PNG) of the fixed-noise grids, in step order
    real_grid: bytes | None
    diagnostics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # RUN/config.yaml, empty when absent
    wall_times: tuple[float, float] | None = None  # first and last event's wall time (seconds)
    name: str = ""

    @property
    def alarms(self) -> list[dict]:
        return self.diagnostics.get("alarms", [])

    @property
    def last_step(self) -> int:
        return max((pts[-1][0] for pts in self.scalars.values() if pts), default=0)

    def final(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return points[-1][1] if points else None


def load_run(run_dir: Path, name: str | None = None) -> RunData:
    """Every scalar series (the last value logged at each step) and image grid of the run, plus its
    diagnostics and config; `name` defaults to the folder's name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dcgan_dist.metrics import TB_DIR

    run_dir = Path(run_dir)
    tb = run_dir / TB_DIR
    if not tb.is_dir() or not any(p.name.startswith("events.") for p in tb.iterdir()):
        raise ReportError(f"{run_dir}: not a run folder (no TensorBoard events in {tb}), "
                          "expected the run directory of a dcgan-train run")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars, times = {}, []
    for tag in tags.get("scalars", []):
        events = acc.Scalars(tag)
        times += [events[0].wall_time, events[-1].wall_time] if events else []
        scalars[tag] = sorted({e.step: e.value for e in events}.items())
    images = tags.get("images", [])
    grids = []
    if GRID_TAG in images:
        events = acc.Images(GRID_TAG)
        times += [e.wall_time for e in events]
        grids = sorted({e.step: e.encoded_image_string for e in events}.items())
    real = acc.Images(REAL_GRID_TAG)[-1].encoded_image_string if REAL_GRID_TAG in images else None
    diagnostics = _read_json(run_dir / DIAGNOSTICS_JSON)
    config = _read_yaml(run_dir / CONFIG_YAML)
    wall = (min(times), max(times)) if times else None
    return RunData(scalars, grids, real, diagnostics, config, wall, name or run_dir.resolve().name)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        return {}
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(tree, dict):
        raise ReportError(f"{path}: expected a mapping of config sections, got {type(tree).__name__}")
    return tree


# ------------------------------------------------------------------------------------------ numbers

def format_tick(value: float, step: float) -> str:
    """`value` with the decimals that `step` (the spacing of the values shown with it) needs:
    0.01, 0.02, ...; 250, 500; scientific only far from 1, and short: 2e-5, 3e6 (never 1e-05)."""
    if value == 0:
        return "0"
    step = abs(step) or abs(value)
    if step < 1e-4 or abs(value) >= 1e6:
        digits = max(0, math.floor(math.log10(abs(value)) + 1e-9) - math.floor(math.log10(step) + 1e-9))
        mantissa, exponent = f"{value:.{digits}e}".split("e")
        if "." in mantissa:
            mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


def short_number(value: float) -> str:
    """Two decimals (0.71, 12.35), or two significant digits below 0.01 (0.0031, 2.1e-5)."""
    if value == 0 or abs(value) >= 0.01 or not math.isfinite(value):
        return f"{value:.2f}"
    if abs(value) >= 1e-4:
        return f"{value:.2g}"
    rounded = float(f"{value:.2g}")
    return format_tick(rounded, 10.0 ** (math.floor(math.log10(abs(rounded))) - 1))


def _multiples(lo: float, hi: float, step: float) -> list[float]:
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [float(f"{k * step:.12g}") for k in range(first, last + 1)]


def nice_ticks(lo: float, hi: float, count: int = 5, min_step: float = 0.0) -> tuple[list[float], float]:
    """Round values 1, 2 or 5 x 10^k apart inside [lo, hi], as close to `count` of them as such spacings
    allow (the fewer on a tie), never closer than `min_step`; returns the values and their spacing."""
    if not hi > lo:
        return [lo], abs(lo) or 1.0
    step = 10.0 ** math.ceil(math.log10(hi - lo))
    best = _multiples(lo, hi, step), step
    for factor in (2, 2.5, 2) * 40:  # 10 -> 5 -> 2 -> 1 -> 0.5 ...
        values = _multiples(lo, hi, step)
        if abs(len(values) - count) < abs(len(best[0]) - count):
            best = values, step
        finer = float(f"{step / factor:.12g}")
        if len(values) > count or finer < min_step:
            break
        step = finer
    return best


def axis_ticks(lo: float, hi: float, log: bool = False, count: int = 5,
               min_step: float = 0.0) -> list[tuple[float, str]]:
    """Tick values in [lo, hi] with their labels. Linear axes: nice_ticks. Log axes: decades (every k-th
    decade when there are many), or 1-2-5 values when the range spans less than two decades, or evenly
    spaced values within a narrow range."""
    if log:
        a, b = math.log10(lo), math.log10(hi)
        decades = list(range(math.ceil(a - 1e-9), math.floor(b + 1e-9) + 1))
        if len(decades) >= 2:
            every = math.ceil(len(decades) / (count + 1))
            return [(10.0 ** e, format_tick(10.0 ** e, 10.0 ** e)) for e in decades if e % every == 0]
        values = [float(f"{m * 10.0 ** e:.12g}") for e in range(math.floor(a), math.ceil(b) + 1) for m in (1, 2, 5)]
        values = [v for v in values if lo <= v <= hi]
        if len(values) >= 3:
            return [(v, format_tick(v, v)) for v in values]
    values, step = nice_ticks(lo, hi, count, min_step)
    return [(v, format_tick(v, step)) for v in values]


# ------------------------------------------------------------------------------------------ layer names

def layer_names(config: dict) -> dict[str, str]:
    """The per-layer gradient tags of a run (grad/G/<key>, grad/D/<key>) -> the layer's name.

    The keys are those `layer_grad_norms` gives G and D built with the run's model config (on the
    meta device: no memory, no time), so they match what training logged; each conv is named by
    its position and channels, e.g. "convT1 (100->512)", "conv2 (64->128)", and each BatchNorm
    after the conv it follows, e.g. "bn2 (128)". Empty without the run's model config.
    """
    if not isinstance(config.get("model"), dict):
        return {}
    import torch
    from torch import nn

    from dcgan_dist.config import ModelConfig
    from dcgan_dist.models import Discriminator, Generator
    from dcgan_dist.step import layer_grad_norms

    model = ModelConfig(**{k: v for k, v in config["model"].items() if k in ModelConfig.__dataclass_fields__})
    with torch.device("meta"):
        nets = {"G": Generator(model.nz, model.ngf, model.channels), "D": Discriminator(model.ndf, model.channels)}
    names = {}
    for side, net in nets.items():
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        keys = [k for k in layer_grad_norms(net) if k != "total"]  # in named_modules order, like the modules below
        modules = [m for m in net.modules() if next(m.parameters(recurse=False), None) is not None]
        convs = 0
        for key, module in zip(keys, modules, strict=True):
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                convs += 1
                kind = "convT" if isinstance(module, nn.ConvTranspose2d) else "conv"
                name = f"{kind}{convs} ({module.in_channels}->{module.out_channels})"
            elif isinstance(module, nn.BatchNorm2d):
                name = f"bn{convs} ({module.num_features})"
            else:
                name = f"{type(module).__name__} {key}"
            names[f"grad/{side}/{key}"] = name
    return names


# ------------------------------------------------------------------------------------------ charts

@dataclass
class Series:
    label: str
    colour: str
    points: list[tuple[float, float]]  # (step, value), or pixels once laid out
    dash: str = ""  # SVG dash pattern; "" is a solid line


@dataclass
class AlarmMark:
    step: int
    colour: str
    label: str  # written beside the line; "" for a repeated firing
    title: str  # SVG tooltip, e.g. "healthy: mode_collapse at step 250"


@dataclass
class Chart:
    """A panel laid out in pixels (origin top left of the chart), drawn by either back end."""

    title: str
    height: int
    lines: list[Series]
    legend: list[tuple[float, float, Series]]  # x, y of each legend entry: a series' label, colour and dash
    xticks: list[tuple[float, str]]
    yticks: list[tuple[float, str]]
    vlines: list[tuple[float, AlarmMark]]  # x of each alarm
    hlines: list[tuple[float, str]]  # y, label (thresholds)


def _text_w(text: str) -> float:
    return CHAR_W * len(text)


def _spaced(ticks: list[tuple[float, str]], gap: float) -> list[tuple[float, str]]:
    """Every other tick, repeatedly, until neighbouring labels are at least `gap` px apart plus their width."""
    while len(ticks) > 2 and any(b - a < gap + (_text_w(ta) + _text_w(tb)) / 2
                                 for (a, ta), (b, tb) in zip(ticks, ticks[1:])):
        ticks = ticks[::2]
    return ticks


def place(title: str, series: list[Series], log: bool, thresholds: list[tuple[float, str]],
          alarms: list[AlarmMark], legend: list[Series] | None = None) -> Chart | None:
    """Lay out series of (step, value) points as a chart, with `legend` (default: one entry per series drawn);
    None when there is nothing to draw."""
    def drawable(v: float) -> bool:  # a NaN mean (an interval of non-finite steps) or a log axis' 0 is left out
        return math.isfinite(v) and (v > 0 or not log)

    series = [Series(s.label, s.colour, [(x, v) for x, v in s.points if drawable(v)], s.dash) for s in series]
    series = [s for s in series if s.points]
    thresholds = [(v, label) for v, label in thresholds if drawable(v)]
    if not series:
        return None
    fy = math.log10 if log else (lambda v: v)
    steps = [x for s in series for x, _ in s.points]
    values = [fy(v) for s in series for _, v in s.points] + [fy(v) for v, _ in thresholds]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.04 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    w = CHART_W - LEFT - RIGHT

    def px(step: float) -> float:
        return LEFT + (step - x0) / (x1 - x0) * w

    def py(value: float) -> float:
        return TOP + (1 - (fy(value) - y0) / (y1 - y0)) * PLOT_H

    lines = [Series(s.label, s.colour, [(px(x), py(v)) for x, v in s.points], s.dash) for s in series]
    lo, hi = (10 ** y0, 10 ** y1) if log else (y0, y1)
    yticks = [(py(v), text) for v, text in axis_ticks(lo, hi, log)]
    xticks = _spaced([(px(v), text) for v, text in axis_ticks(x0, x1, count=6, min_step=1)], gap=10)
    vlines = [(px(a.step), a) for a in alarms if x0 <= a.step <= x1]
    hlines = [(py(v), label) for v, label in thresholds]
    entries, x, y = [], LEFT, TOP + PLOT_H + 30
    for s in series if legend is None else legend:
        width = 22 + _text_w(s.label) + 12
        if x > LEFT and x + width > CHART_W - RIGHT:
            x, y = LEFT, y + LEGEND_ROW
        entries.append((x, y, s))
        x += width
    return Chart(title, max(CHART_H, int(y + 10)), lines, entries, xticks, yticks, vlines, hlines)


def _panel_tags(panel: Panel, run: RunData, order: dict[str, str]) -> list[str]:
    """The panel's tags the run logged; a per-layer panel's in the model's layer order."""
    position = {tag: i for i, tag in enumerate(order)}
    under = [t for t in run.scalars if panel.prefix and t.startswith(panel.prefix) and t not in panel.exclude
             and t not in panel.tags]
    under.sort(key=lambda t: (position.get(t, len(position)), _number_or_minus_one(t.rsplit("/", 1)[1]), t))
    return [t for t in (*panel.tags, *under) if run.scalars.get(t)]


def _number_or_minus_one(text: str) -> int:
    return int(text) if text.isdigit() else -1


def _thresholds(panel: Panel, runs: list[RunData]) -> list[tuple[float, str]]:
    values = {r.diagnostics.get("config", {}).get(panel.threshold) for r in runs} if panel.threshold else set()
    return [(v, f"{panel.threshold} {v:g}") for v in sorted(v for v in values if v is not None)]


def _alarm_marks(run: RunData, colour: str = "") -> list[AlarmMark]:
    """The run's alarms as chart marks, the first firing of each labelled with its name; all in `colour`
    (a comparison: the run's colour, and the run named in the tooltip), or else coloured by kind."""
    first = {a["alarm"]: a["step"] for a in reversed(run.alarms)}
    who = f"{run.name}: " if colour else ""
    return [AlarmMark(a["step"], colour or ALARM_COLOURS.get(a["alarm"], "#000000"),
                      a["alarm"] if first[a["alarm"]] == a["step"] else "", f"{who}{a['alarm']} at step {a['step']}")
            for a in run.alarms]


def layout(panel: Panel, run: RunData, names: dict[str, str] | None = None) -> Chart | None:
    """One run's panel: one colour per tag, per-layer tags shown by `names` (layer_names); None when the
    run logged none of the panel's tags. Alarms are coloured by kind."""
    names = names or {}
    tags = _panel_tags(panel, run, names)
    series = [Series(names.get(t, t.removeprefix(panel.prefix)) if t not in panel.tags else t,
                     COLOURS[i % len(COLOURS)], run.scalars[t]) for i, t in enumerate(tags)]
    return place(panel.title, series, panel.log, _thresholds(panel, [run]), _alarm_marks(run))


def layout_compare(panel: Panel, runs: list[RunData]) -> Chart | None:
    """A panel over several runs: one colour per run, one dash pattern per tag; alarms in their run's colour."""
    series, alarms = [], []
    tags = [t for t in panel.tags if any(r.scalars.get(t) for r in runs)]
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        series += [Series(f"{run.name} {t}", colour, run.scalars.get(t, []), DASHES[j % len(DASHES)])
                   for j, t in enumerate(tags)]
        alarms += _alarm_marks(run, colour)
    legend = [Series(r.name, COLOURS[i % len(COLOURS)], []) for i, r in enumerate(runs)]
    if len(tags) > 1:
        legend += [Series(t, NEUTRAL, [], DASHES[j % len(DASHES)]) for j, t in enumerate(tags)]
    return place(panel.title, series, panel.log, _thresholds(panel, runs), alarms, legend)


def charts(run: RunData) -> list[Chart]:
    names = layer_names(run.config)
    return [c for c in (layout(p, run, names) for p in PANELS) if c is not None]


def compare_charts(runs: list[RunData]) -> list[Chart]:
    """Every panel but the per-layer ones, which each run's own report shows."""
    return [c for c in (layout_compare(p, runs) for p in PANELS if not p.prefix) if c is not None]


def _alarm_label_at(x: float, k: int) -> tuple[float, float, str]:
    """Where the k-th alarm label of a chart goes: beside its line, stacked down the plot, never off the right."""
    y = TOP + 11 + 11 * (k % (PLOT_H // 11 - 1))
    return (x - 3, y, "end") if x > CHART_W - RIGHT - 100 else (x + 3, y, "start")


def chart_svg(chart: Chart) -> str:
    e = html.escape
    bottom = TOP + PLOT_H
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{chart.height}" '
             f'viewBox="0 0 {CHART_W} {chart.height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{CHART_W}" height="{chart.height}" fill="white"/>',
             f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{e(chart.title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{CHART_W - LEFT - RIGHT}" height="{PLOT_H}" fill="none" '
             'stroke="#999"/>']
    for y, text in chart.yticks:
        parts.append(f'<line x1="{LEFT - 3}" x2="{LEFT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#999"/>'
                     f'<text class="ytick" x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{e(text)}</text>')
    for x, text in chart.xticks:
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 3}" stroke="#999"/>'
                     f'<text class="xtick" x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{e(text)}</text>')
    for y, text in chart.hlines:
        parts.append(f'<line x1="{LEFT}" x2="{CHART_W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555" '
                     f'stroke-dasharray="2,3"><title>{e(text)}</title></line>')
    labelled = 0
    for x, mark in chart.vlines:
        parts.append(f'<line class="alarm" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{bottom}" stroke="{mark.colour}" '
                     f'stroke-dasharray="5,3" stroke-width="1.5"><title>{e(mark.title)}</title></line>')
        if mark.label:
            tx, ty, anchor = _alarm_label_at(x, labelled)
            labelled += 1
            parts.append(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" font-size="10" '
                         f'fill="{mark.colour}">{e(mark.label)}</text>')
    for line in chart.lines:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in line.points)
        dash = f' stroke-dasharray="{line.dash}"' if line.dash else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{line.colour}" stroke-width="1.5"{dash}>'
                     f'<title>{e(line.label)}</title></polyline>')
    for x, y, entry in chart.legend:
        dash = f' stroke-dasharray="{entry.dash}"' if entry.dash else ""
        parts.append(f'<line x1="{x:.1f}" x2="{x + 18:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{entry.colour}" '
                     f'stroke-width="2"{dash}/><text class="legend" x="{x + 22:.1f}" y="{y + 4:.1f}">'
                     f'{e(entry.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _dashed_line(d: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: str, dash: str,
                 width: int) -> None:
    """A polyline with an SVG dash pattern ("7,3": 7 px drawn, 3 px left out), as PIL has none."""
    if not dash:
        d.line(points, fill=colour, width=width)
        return
    pattern = [float(v) for v in dash.split(",")]
    index, left = 0, pattern[0]
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        length = math.hypot(xb - xa, yb - ya)
        done = 0.0
        while done < length - 1e-9:
            part = min(left, length - done)
            if index % 2 == 0:
                t0, t1 = done / length, (done + part) / length
                d.line((xa + (xb - xa) * t0, ya + (yb - ya) * t0, xa + (xb - xa) * t1, ya + (yb - ya) * t1),
                       fill=colour, width=width)
            done += part
            left -= part
            if left <= 1e-9:
                index = (index + 1) % len(pattern)
                left = pattern[index]


def draw_chart(chart: Chart, canvas: Image.Image, origin: tuple[int, int]) -> None:
    from dcgan_dist.imaging import font  # imaging loads torch: not at import time, so --help stays fast

    d = ImageDraw.Draw(canvas)
    ox, oy = origin
    small, bold = font(11), font(13)
    bottom = TOP + PLOT_H
    d.text((ox + LEFT, oy + 6), chart.title, fill="black", font=bold)
    d.rectangle((ox + LEFT, oy + TOP, ox + CHART_W - RIGHT, oy + bottom), outline="#999999")
    for y, text in chart.yticks:
        d.line((ox + LEFT - 3, oy + y, ox + LEFT, oy + y), fill="#999999")
        d.text((ox + LEFT - 5, oy + y), text, fill="black", font=small, anchor="rm")
    for x, text in chart.xticks:
        d.line((ox + x, oy + bottom, ox + x, oy + bottom + 3), fill="#999999")
        d.text((ox + x, oy + bottom + 6), text, fill="black", font=small, anchor="mt")
    for y, _ in chart.hlines:
        _dashed_line(d, [(ox + LEFT, oy + y), (ox + CHART_W - RIGHT, oy + y)], "#555555", "2,3", 1)
    labelled = 0
    for x, mark in chart.vlines:
        _dashed_line(d, [(ox + x, oy + TOP), (ox + x, oy + bottom)], mark.colour, "5,3", 2)
        if mark.label:
            tx, ty, anchor = _alarm_label_at(x, labelled)
            labelled += 1
            d.text((ox + tx, oy + ty), mark.label, fill=mark.colour, font=font(10),
                   anchor="rs" if anchor == "end" else "ls")
    for line in chart.lines:
        shifted = [(ox + x, oy + y) for x, y in line.points]
        if len(shifted) == 1:
            x, y = shifted[0]
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=line.colour)
        else:
            _dashed_line(d, shifted, line.colour, line.dash, 2)
    for x, y, entry in chart.legend:
        _dashed_line(d, [(ox + x, oy + y), (ox + x + 18, oy + y)], entry.colour, entry.dash, 2)
        d.text((ox + x + 22, oy + y), entry.label, fill="black", font=small, anchor="lm")


# ------------------------------------------------------------------------------------------ what happened

def format_duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def config_summary(run: RunData) -> list[tuple[str, str]]:
    """The run's key settings (from config.yaml) and how long it ran, as (name, value) pairs."""
    cfg = run.config

    def get(section: str, key: str) -> str:
        value = (cfg.get(section) or {}).get(key)
        if value is None:
            return "?"
        return format_tick(value, value) if isinstance(value, float) else str(value)

    rows = []
    if cfg:
        data = Path(get("data", "source")).name
        modes = (run.diagnostics.get("reference") or {}).get("modes")
        rows += [("data", data + (f" (synthetic, {modes} modes)" if modes else "")),
                 ("model", f"nz {get('model', 'nz')}, ngf {get('model', 'ngf')}, ndf {get('model', 'ndf')}"),
                 ("batch", f"{get('train', 'batch_size')} per process"),
                 ("learning rates", f"lr_g {get('optim', 'lr_g')}, lr_d {get('optim', 'lr_d')}"),
                 ("G loss", get("loss", "generator")), ("precision", str(cfg.get("precision", "?")))]
    else:
        rows.append(("config", f"no {CONFIG_YAML} in the run folder"))
    rows.append(("steps", str(run.last_step)))
    if run.wall_times:
        rows.append(("duration", format_duration(run.wall_times[1] - run.wall_times[0]) + " (first to last event)"))
    return rows


def final_values(run: RunData) -> str:
    shown = [f"{name} {short_number(run.final(tag))}" for tag, name in FINAL_VALUES if run.final(tag) is not None]
    return ", ".join(shown)


def _alarm_phrase(run: RunData, name: str, firings: list[dict]) -> str:
    first = firings[0]
    phrase = f"{name} alarm from step {first['step']}"
    if len(firings) > 1:
        phrase += f" (fired {len(firings)} times)"
    m = first.get("metrics", {})
    if name == MODE_COLLAPSE:
        detail = [f"diversity {short_number(m['diversity/ratio'])} of real"] if "diversity/ratio" in m else []
        modes = (run.diagnostics.get("reference") or {}).get("modes")
        if "coverage/modes" in m and modes:
            detail.append(f"{int(m['coverage/modes'])} of {modes} modes")
        phrase += f" ({', '.join(detail)})" if detail else ""
        if "D(G(z))" in m:
            phrase += f" while D(G(z)) was {short_number(m['D(G(z))'])}"
    elif name == VANISHING_GRADIENTS and m.get("grad/G/early"):
        phrase += f": G's gradient fell to {short_number(m['grad/G/total'] / m['grad/G/early'])} of its early value"
        if "D(G(z))" in m:
            phrase += f" while D(G(z)) was {short_number(m['D(G(z))'])}"
    return phrase


def run_sentence(run: RunData) -> str:
    """One sentence saying what happened in the run, from its alarms and last logged values."""
    if not run.diagnostics:
        head = "diagnostics were off"
    elif not run.alarms:
        head = "no alarm fired"
    else:
        by_name: dict[str, list[dict]] = {}
        for a in run.alarms:
            by_name.setdefault(a["alarm"], []).append(a)
        head = "; ".join(_alarm_phrase(run, name, firings) for name, firings in by_name.items())
    end = [f"{label} {short_number(run.final(tag))}" for tag, label in
           (("D(x)", "D(x)"), ("D(G(z))/before_D_step", "D(G(z))")) if run.final(tag) is not None]
    parts = [head] + ([f"final {', '.join(end)}"] if end else [])
    if run.final("diversity/ratio") is not None:
        parts.append(f"diversity ratio {short_number(run.final('diversity/ratio'))} of real")
    skipped = sum(v for _, v in run.scalars.get("train/nonfinite_steps", []))
    if skipped:
        parts.append(f"{int(skipped)} non-finite steps skipped")
    return f"{run.name}: " + "; ".join(parts)


def alarm_lines(run: RunData) -> list[tuple[str, str]]:
    """(line, colour): each alarm in alarm red, or one neutral line when none fired."""
    if not run.alarms:
        return [("no alarm fired", OK_GREEN) if run.diagnostics else
                ("no diagnostics.json (diagnostics were off)", NEUTRAL)]
    return [(f"step {a['step']}: {a['alarm']}: " + ", ".join(f"{k} {v:.4g}" for k, v in a["metrics"].items()),
             ALARM_RED) for a in run.alarms]


def reference_line(run: RunData) -> str:
    ref = run.diagnostics.get("reference") or {}
    parts = [f"real mean MS-SSIM {ref['real_ms_ssim']:.3f}"] if "real_ms_ssim" in ref else []
    if "classifier_accuracy" in ref:
        parts.append(f"mode classifier ({ref['modes']} modes) held-out accuracy {ref['classifier_accuracy']:.3f}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ grids

def pick_evenly(items: list, count: int) -> list:
    """`count` items spread evenly over the list, always including the first and the last."""
    if len(items) <= count:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [-1]
    return [items[i] for i in picks]


def compare_rows(runs: list[RunData], count: int) -> list[tuple[str, list[bytes | None]]]:
    """(row label, one grid per run): at up to `count` steps all runs logged a grid, spread evenly and
    ending with the last; when they share none, each run's last grid."""
    common = sorted(set.intersection(*(set(dict(r.grids)) for r in runs)))
    if not common:
        return [("last grid", [r.grids[-1][1] if r.grids else None for r in runs])]
    return [(f"step {s}", [dict(r.grids)[s] for r in runs]) for s in pick_evenly(common, count)]


def _thumbnail(png: bytes, width: int = GRID_PX) -> Image.Image:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------ HTML

STYLE = ("body{font-family:sans-serif;margin:16px}svg{margin:4px;vertical-align:top}"
         "figure{display:inline-block;margin:4px;vertical-align:top}figcaption{text-align:center;font-size:12px}"
         ".alarm{color:#b00000}.ok{color:#1a7f37}.neutral{color:#555}"
         "table.summary{border-collapse:collapse}table.summary td,table.summary th{padding:2px 12px 2px 0;"
         "text-align:left;vertical-align:top}table.grids td{vertical-align:top;padding:2px}"
         "table.grids th{padding:2px 8px;text-align:left}"
         ".zoom input{display:none}.zoom img{display:block;width:264px;cursor:zoom-in}"
         ".zoom input:checked+img{width:auto;cursor:zoom-out}.swatch{display:inline-block;width:12px;height:12px;"
         "margin-right:6px}")
LINE_CLASS = {ALARM_RED: "alarm", OK_GREEN: "ok", NEUTRAL: "neutral"}


def _head(title: str) -> list[str]:
    return ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style></head><body>"]


def _grid_html(png: bytes) -> str:
    """The grid at full resolution, shown GRID_PX wide; a click toggles full size (no script needed)."""
    return (f"<label class='zoom' title='click: full size / small'><input type='checkbox'>"
            f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'></label>")


def render_html(run: RunData, run_dir: Path, grids: int) -> str:
    e = html.escape
    out = _head(f"dcgan-report {run_dir}") + [f"<h1>Run {e(str(run_dir))}</h1>", "<table class='summary'>"]
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in config_summary(run)]
    if final_values(run):
        out.append(f"<tr><th>final values</th><td>{e(final_values(run))} (step {run.last_step})</td></tr>")
    out += ["</table>", f"<p class='sentence'>{e(run_sentence(run))}</p>"]
    legend = ", ".join(f"<span style='color:{c}'>{n}</span>" for n, c in ALARM_COLOURS.items())
    out.append(f"<h2>Alarms</h2><p>Dashed vertical lines on the charts: {legend}.</p><ul>")
    out += [f"<li class='{LINE_CLASS[colour]}'>{e(line)}</li>" for line, colour in alarm_lines(run)]
    out.append("</ul>")
    if reference_line(run):
        out.append(f"<p>{e(reference_line(run))}</p>")
    out.append("<h2>Curves</h2><div>")
    out += [chart_svg(c) for c in charts(run)]
    out.append("</div><h2>Samples from the fixed noise over time</h2><p>Click a grid for full size.</p><div>")
    shown = pick_evenly(run.grids, grids) + ([("real", run.real_grid)] if run.real_grid else [])
    for step, png in shown:
        caption = "real samples" if step == "real" else f"step {step}"
        out.append(f"<figure>{_grid_html(png)}<figcaption>{caption}</figcaption></figure>")
    out.append("</div></body></html>")
    return "\n".join(out)


def compare_html(runs: list[RunData], grids: int, real_samples: bool) -> str:
    e = html.escape
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(runs))]
    names = ", ".join(r.name for r in runs)
    out = _head(f"dcgan-report: {names}") + [f"<h1>Comparison: {e(names)}</h1>", "<h2>What happened</h2><ul>"]
    out += [f"<li class='sentence'><span class='swatch' style='background:{c}'></span>{e(run_sentence(r))}</li>"
            for r, c in zip(runs, colours)]
    summaries = [dict(config_summary(r)) for r in runs]
    keys = list(dict.fromkeys(k for summary in summaries for k in summary))
    out.append("</ul><h2>Runs</h2><table class='summary'><tr><th>run</th>")
    out += [f"<th>{e(k)}</th>" for k in keys]
    out.append("</tr>")
    for run, colour, summary in zip(runs, colours, summaries):
        cells = "".join(f"<td>{e(summary.get(k, ''))}</td>" for k in keys)
        out.append(f"<tr><th style='color:{colour}'>{e(run.name)}</th>{cells}</tr>")
    out.append("</table><h2>Curves</h2><p>One colour per run; dashed vertical lines: alarms, in the colour of "
               "the run that raised them. The per-layer gradient norms are in each run's own report.</p><div>")
    out += [chart_svg(c) for c in compare_charts(runs)]
    out.append("</div><h2>Samples from the fixed noise</h2><p>Click a grid for full size.</p>"
               "<table class='grids'><tr><th></th>")
    out += [f"<th style='color:{c}'>{e(r.name)}</th>" for r, c in zip(runs, colours)]
    out.append("</tr>")
    for label, pngs in compare_rows(runs, grids):
        cells = "".join(f"<td>{_grid_html(p) if p else 'no grid'}</td>" for p in pngs)
        out.append(f"<tr class='grid-row'><th>{e(label)}</th>{cells}</tr>")
    out.append("</table>")
    real = next((r for r in runs if r.real_grid), None) if real_samples else None
    if real is not None:
        out.append(f"<figure>{_grid_html(real.real_grid)}<figcaption>real samples ({e(real.name)}'s data)"
                   "</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ PNG

def _wrap(lines: list[tuple[str, str, str | None]], width: float, size: int = 13) -> list[tuple[str, str, str | None]]:
    """(text, colour, swatch colour) lines broken at spaces to fit `width` px; the swatch stays on the first."""
    from dcgan_dist.imaging import font

    f = font(size)
    out = []
    for text, colour, swatch in lines:
        room = width - (18 if swatch else 0)
        words, line = text.split(" "), ""
        for word in words:
            candidate = f"{line} {word}" if line else word
            if line and f.getlength(candidate) > room:
                out.append((line, colour, swatch))
                line, swatch = word, None
            else:
                line = candidate
        out.append((line, colour, swatch))
    return out


def _draw_text_block(d: ImageDraw.ImageDraw, lines: list[tuple[str, str, str | None]], x: int, y: int,
                     size: int = 13) -> int:
    """Draw wrapped lines from (x, y) with 18 px line spacing; returns the y below them."""
    from dcgan_dist.imaging import font

    f = font(size)
    for text, colour, swatch in lines:
        dx = 0
        if swatch:
            d.rectangle((x, y + 3, x + 11, y + 14), fill=swatch)
            dx = 18
        d.text((x + dx, y), text, fill=colour, font=f)
        y += 18
    return y


def _draw_charts(canvas: Image.Image, laid: list[Chart], top: int) -> int:
    """Charts two per row from `top`; returns the y below them."""
    for i in range(0, len(laid), 2):
        row = laid[i:i + 2]
        for j, chart in enumerate(row):
            draw_chart(chart, canvas, (PAD + j * (CHART_W + PAD), top))
        top += max(c.height for c in row) + PAD
    return top


def _charts_height(laid: list[Chart]) -> int:
    return sum(max(c.height for c in laid[i:i + 2]) + PAD for i in range(0, len(laid), 2))


def render_png(run: RunData, run_dir: Path, grids: int) -> Image.Image:
    """The run's page: summary, charts, then the grids at full resolution, as many per row as fit."""
    from dcgan_dist.imaging import font

    laid = charts(run)
    width = 2 * CHART_W + 3 * PAD
    header = [(f"Run {run_dir}", "black", None)]
    header += [(f"{k}: {v}", "black", None) for k, v in config_summary(run)]
    if final_values(run):
        header.append((f"final values: {final_values(run)} (step {run.last_step})", "black", None))
    header.append((run_sentence(run), "black", None))
    header += [(line, colour, None) for line, colour in alarm_lines(run)]
    header += [(reference_line(run), "black", None)] if reference_line(run) else []
    header = _wrap(header, width - 2 * PAD)
    header_h = 10 + 18 * len(header) + 8
    shown = pick_evenly(run.grids, grids) + ([("real", run.real_grid)] if run.real_grid else [])
    images = [(step, Image.open(io.BytesIO(png)).convert("RGB")) for step, png in shown]
    cell_w = max((im.width for _, im in images), default=GRID_PX)
    per_row = max(1, (width - PAD) // (cell_w + PAD))
    cell_h = max((im.height for _, im in images), default=0) + 22
    grid_rows = math.ceil(len(images) / per_row)
    height = header_h + _charts_height(laid) + grid_rows * (cell_h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    _draw_text_block(d, header, PAD, 10)
    top = _draw_charts(canvas, laid, header_h)
    for i, (step, image) in enumerate(images):
        x = PAD + (i % per_row) * (cell_w + PAD)
        y = top + (i // per_row) * (cell_h + PAD)
        d.text((x + image.width // 2, y + 2), "real samples" if step == "real" else f"step {step}", fill="black",
               font=font(13), anchor="mt")
        canvas.paste(image, (x, y + 20))
    return canvas


def compare_png(runs: list[RunData], grids: int, real_samples: bool) -> Image.Image:
    """The comparison page: sentences, settings, overlaid charts, then a table of grids (a column per run)."""
    from dcgan_dist.imaging import font

    colours = [COLOURS[i % len(COLOURS)] for i in range(len(runs))]
    label_w = 90
    width = max(2 * CHART_W + 3 * PAD, label_w + len(runs) * (GRID_PX + PAD) + PAD)
    header = [("Comparison: " + ", ".join(r.name for r in runs), "black", None)]
    header += [(run_sentence(r), "black", c) for r, c in zip(runs, colours)]
    header += [(f"{r.name}: " + "; ".join(f"{k} {v}" for k, v in config_summary(r)), NEUTRAL, None) for r in runs]
    header.append(("One colour per run; dashed vertical lines: alarms in the run's colour. Per-layer gradient "
                   "norms: each run's own report.", NEUTRAL, None))
    header = _wrap(header, width - 2 * PAD)
    header_h = 10 + 18 * len(header) + 8
    laid = compare_charts(runs)
    rows = compare_rows(runs, grids)
    real = next((r for r in runs if r.real_grid), None) if real_samples else None
    thumbs = [(label, [_thumbnail(p) if p else None for p in pngs]) for label, pngs in rows]
    if real is not None:
        thumbs.append((f"real ({real.name})", [_thumbnail(real.real_grid)] + [None] * (len(runs) - 1)))
    cell_h = max((t.height for _, row in thumbs for t in row if t), default=GRID_PX) + PAD
    height = header_h + _charts_height(laid) + 24 + len(thumbs) * cell_h + PAD
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    _draw_text_block(d, header, PAD, 10)
    top = _draw_charts(canvas, laid, header_h)
    text_font = font(13)
    for j, (run, colour) in enumerate(zip(runs, colours)):
        d.text((label_w + j * (GRID_PX + PAD) + GRID_PX // 2, top + 4), run.name, fill=colour, font=text_font,
               anchor="mt")
    top += 24
    for i, (label, row) in enumerate(thumbs):
        y = top + i * cell_h
        d.text((PAD, y + 4), label, fill="black", font=text_font)
        for j, thumb in enumerate(row):
            if thumb is not None:
                canvas.paste(thumb, (label_w + j * (GRID_PX + PAD), y))
    return canvas


# ------------------------------------------------------------------------------------------ files

def _output_kind(out: Path) -> str:
    kind = out.suffix.lower()
    if kind not in (".html", ".png"):
        raise ReportError(f"--out {out}: expected a file name ending in .html or .png")
    return kind


def _save(out: Path, page: str | Image.Image) -> Path:
    if isinstance(page, str):
        atomic_write(out, page)
    else:
        # 256 colours: charts and sample grids survive it, and the page shrinks about 3x
        page = page.quantize(256, method=Image.Quantize.MEDIANCUT)
        with atomic_path(out) as tmp:
            page.save(tmp, format="PNG", optimize=True)
    return out


def write_report(run_dir: Path, out: Path, grids: int = 6, real_samples: bool = True) -> Path:
    """Render `run_dir`'s report to `out` (.html or .png), written to a temporary name and renamed.

    `real_samples=False` leaves out the grid of training images: a report that goes where the data's
    licence does not (CelebA into a repository's docs) shows only what G made."""
    out = Path(out)
    kind = _output_kind(out)
    run = load_run(Path(run_dir))
    if not real_samples:
        run.real_grid = None
    page = render_html(run, Path(run_dir), grids) if kind == ".html" else render_png(run, Path(run_dir), grids)
    return _save(out, page)


def write_comparison(run_dirs: list[Path], out: Path, labels: list[str] | None = None, grids: int = 6,
                     real_samples: bool = True) -> Path:
    """One page comparing runs trained on the same data with the same budget (.html or .png); each run is
    named by `labels`, or else by its folder's name."""
    out = Path(out)
    kind = _output_kind(out)
    names = labels or [Path(r).resolve().name for r in run_dirs]
    if len(set(names)) < len(names):  # runs/a/run and runs/b/run: name them by the paths given
        names = [str(r) for r in run_dirs]
    runs = [load_run(Path(r), name) for r, name in zip(run_dirs, names)]
    page = compare_html(runs, grids, real_samples) if kind == ".html" else compare_png(runs, grids, real_samples)
    return _save(out, page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcgan-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="a run directory (run.dir of dcgan-train)")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="RUN",
                        help="compare these run directories on one page instead (same data, same budget)")
    parser.add_argument("--labels", help="with --compare: the runs' names, comma-separated (default: folder names)")
    parser.add_argument("--out", type=Path, required=True, help="report file: .html or .png")
    parser.add_argument("--grids", type=int, default=6, help="sample grids shown over time (default %(default)s)")
    parser.add_argument("--no-real-samples", action="store_true",
                        help="leave out the grid of training images (e.g. CelebA in a figure you publish)")
    args = parser.parse_args(argv)
    if args.grids < 1:
        parser.error(f"--grids: got {args.grids}, expected at least 1")
    if (args.run is None) == (args.compare is None):
        parser.error("expected either one run directory or --compare RUN RUN [...]")
    labels = None
    if args.labels is not None:
        if args.compare is None:
            parser.error("--labels: only with --compare")
        labels = [label.strip() for label in args.labels.split(",")]
        if len(labels) != len(args.compare) or not all(labels) or len(set(labels)) < len(labels):
            parser.error(f"--labels: got {args.labels!r}, expected {len(args.compare)} distinct non-empty names "
                         "separated by commas, one per run of --compare")
    if args.compare is not None and len(args.compare) < 2:
        parser.error(f"--compare: got one run ({args.compare[0]}), expected at least two")
    try:
        if args.compare is not None:
            path = write_comparison(args.compare, args.out, labels, args.grids, not args.no_real_samples)
        else:
            path = write_report(args.run, args.out, args.grids, real_samples=not args.no_real_samples)
    except ReportError as exc:
        print(f"dcgan-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"dcgan-report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
