"""dcgan-report: one page (HTML or PNG) about a run, for people who cannot open TensorBoard.

    dcgan-report runs/smoke --out smoke.html
    dcgan-report runs/smoke --out smoke.png

Reads the run's TensorBoard events (tensorboard's EventAccumulator) and RUN/diagnostics.json,
and draws losses, D's outputs, gradient norms, diversity and coverage with the alarms marked on
every curve, then the fixed-noise sample grids over time. HTML gets inline SVG charts and
base64 PNG grids; PNG is composed with PIL. No plotting library is needed.
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
from dcgan_dist.fileio import atomic_path, atomic_write

GRID_TAG = "images/fake_fixed_noise"
REAL_GRID_TAG = "images/real"
CHART_W, CHART_H = 560, 230
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 30, 44
GRID_PX = 264  # each sample grid is drawn this wide
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#d62728")
ALARM_COLOURS = {VANISHING_GRADIENTS: "#d62728", MODE_COLLAPSE: "#9400d3"}


@dataclass(frozen=True)
class Panel:
    title: str
    tags: tuple[str, ...] = ()
    prefix: str = ""  # also every tag under this prefix, except `tags` listed elsewhere
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

    @property
    def alarms(self) -> list[dict]:
        return self.diagnostics.get("alarms", [])


def load_run(run_dir: Path) -> RunData:
    """Every scalar series (the last value logged at each step) and image grid of the run, plus its diagnostics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dcgan_dist.metrics import TB_DIR

    tb = Path(run_dir) / TB_DIR
    if not tb.is_dir() or not any(p.name.startswith("events.") for p in tb.iterdir()):
        raise ReportError(f"{tb}: no TensorBoard events, expected the run directory of a dcgan-train run")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {}
    for tag in tags.get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        scalars[tag] = sorted(by_step.items())
    images = tags.get("images", [])
    grids = sorted({e.step: e.encoded_image_string for e in acc.Images(GRID_TAG)}.items()) if GRID_TAG in images else []
    real = acc.Images(REAL_GRID_TAG)[-1].encoded_image_string if REAL_GRID_TAG in images else None
    path = Path(run_dir) / DIAGNOSTICS_JSON
    diagnostics = {}
    if path.is_file():
        try:
            diagnostics = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return RunData(scalars, grids, real, diagnostics)


# ------------------------------------------------------------------------------------------ charts

@dataclass
class Chart:
    """A panel laid out in pixels (origin top left of the chart), drawn by either back end."""

    title: str
    lines: list[tuple[str, str, list[tuple[float, float]]]]  # label, colour, points
    xticks: list[tuple[float, str]]
    yticks: list[tuple[float, str]]
    vlines: list[tuple[float, str]]  # x, colour (alarms)
    hlines: list[tuple[float, str]]  # y, label (thresholds)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def layout(panel: Panel, run: RunData) -> Chart | None:
    """Map a panel's series into chart pixels; None when the run logged none of them."""
    tags = list(panel.tags) + sorted(t for t in run.scalars if panel.prefix and t.startswith(panel.prefix)
                                     and t not in panel.exclude and t not in panel.tags)
    series = [(t, run.scalars[t]) for t in tags if run.scalars.get(t)]
    if panel.log:
        series = [(t, [(s, v) for s, v in pts if v > 0]) for t, pts in series]
        series = [(t, pts) for t, pts in series if pts]
    if not series:
        return None
    fy = (lambda v: math.log10(v)) if panel.log else (lambda v: v)
    threshold = run.diagnostics.get("config", {}).get(panel.threshold) if panel.threshold else None
    steps = [s for _, pts in series for s, _ in pts]
    values = [fy(v) for _, pts in series for _, v in pts]
    if threshold is not None and (threshold > 0 or not panel.log):
        values.append(fy(threshold))
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if x1 == x0:
        x1 = x0 + 1
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.04 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    w, h = CHART_W - LEFT - RIGHT, CHART_H - TOP - BOTTOM

    def px(step: float) -> float:
        return LEFT + (step - x0) / (x1 - x0) * w

    def py(value: float) -> float:
        return TOP + (1 - (value - y0) / (y1 - y0)) * h

    lines = [(t.removeprefix(panel.prefix) if t not in panel.tags else t, COLOURS[i % len(COLOURS)],
              [(px(s), py(fy(v))) for s, v in pts]) for i, (t, pts) in enumerate(series)]
    yticks = [(py(v), _label(10 ** v if panel.log else v)) for v in _ticks(y0, y1)]
    xticks = [(px(s), str(int(round(s)))) for s in _ticks(x0, x1)]
    vlines = [(px(a["step"]), ALARM_COLOURS.get(a["alarm"], "#000000")) for a in run.alarms if x0 <= a["step"] <= x1]
    hlines = [(py(fy(threshold)), f"{panel.threshold} {threshold:g}")] if threshold is not None and (
        threshold > 0 or not panel.log) else []
    return Chart(panel.title, lines, xticks, yticks, vlines, hlines)


def charts(run: RunData) -> list[Chart]:
    return [c for c in (layout(p, run) for p in PANELS) if c is not None]


def chart_svg(chart: Chart) -> str:
    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
             f'viewBox="0 0 {CHART_W} {CHART_H}" font-family="sans-serif" font-size="11">',
             f'<rect width="{CHART_W}" height="{CHART_H}" fill="white"/>',
             f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{e(chart.title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{CHART_W - LEFT - RIGHT}" height="{CHART_H - TOP - BOTTOM}" '
             'fill="none" stroke="#999"/>']
    for y, text in chart.yticks:
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{e(text)}</text>')
    for x, text in chart.xticks:
        parts.append(f'<text x="{x:.1f}" y="{CHART_H - BOTTOM + 14}" text-anchor="middle">{e(text)}</text>')
    for y, text in chart.hlines:
        parts.append(f'<line x1="{LEFT}" x2="{CHART_W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555" '
                     f'stroke-dasharray="2,3"><title>{e(text)}</title></line>')
    for x, colour in chart.vlines:
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{CHART_H - BOTTOM}" stroke="{colour}" '
                     'stroke-dasharray="5,3" stroke-width="1.5"/>')
    for label, colour, pts in chart.lines:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5">'
                     f'<title>{e(label)}</title></polyline>')
    x = LEFT
    for label, colour, _ in chart.lines:
        parts.append(f'<rect x="{x}" y="{CHART_H - 16}" width="10" height="3" fill="{colour}"/>'
                     f'<text x="{x + 13}" y="{CHART_H - 11}">{e(label)}</text>')
        x += 18 + 6 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def draw_chart(chart: Chart, canvas: Image.Image, origin: tuple[int, int]) -> None:
    from dcgan_dist.imaging import font  # imaging loads torch: not at import time, so --help stays fast

    d = ImageDraw.Draw(canvas)
    ox, oy = origin
    small, bold = font(11), font(13)
    d.text((ox + LEFT, oy + 6), chart.title, fill="black", font=bold)
    d.rectangle((ox + LEFT, oy + TOP, ox + CHART_W - RIGHT, oy + CHART_H - BOTTOM), outline="#999999")
    for y, text in chart.yticks:
        d.text((ox + LEFT - 4, oy + y), text, fill="black", font=small, anchor="rm")
    for x, text in chart.xticks:
        d.text((ox + x, oy + CHART_H - BOTTOM + 8), text, fill="black", font=small, anchor="mt")
    for y, _ in chart.hlines:
        for x in range(LEFT, CHART_W - RIGHT, 6):
            d.line((ox + x, oy + y, ox + min(x + 2, CHART_W - RIGHT), oy + y), fill="#555555")
    for x, colour in chart.vlines:
        for y in range(TOP, CHART_H - BOTTOM, 8):
            d.line((ox + x, oy + y, ox + x, oy + min(y + 5, CHART_H - BOTTOM)), fill=colour, width=2)
    for _, colour, pts in chart.lines:
        shifted = [(ox + x, oy + y) for x, y in pts]
        if len(shifted) == 1:
            x, y = shifted[0]
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        else:
            d.line(shifted, fill=colour, width=2)
    x = ox + LEFT
    for label, colour, _ in chart.lines:
        d.rectangle((x, oy + CHART_H - 17, x + 10, oy + CHART_H - 14), fill=colour)
        d.text((x + 13, oy + CHART_H - 16), label, fill="black", font=small, anchor="lm")
        x += 18 + int(d.textlength(label, font=small))


# ------------------------------------------------------------------------------------------ pages

def pick_grids(grids: list[tuple[int, bytes]], count: int) -> list[tuple[int, bytes]]:
    """`count` grids spread evenly over the run, always including the first and the last."""
    if len(grids) <= count:
        return grids
    picks = sorted({round(i * (len(grids) - 1) / (count - 1)) for i in range(count)})
    return [grids[i] for i in picks]


def _thumbnail(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return image.resize((GRID_PX, round(image.height * GRID_PX / image.width)), Image.Resampling.LANCZOS)


def alarm_lines(run: RunData) -> list[str]:
    if not run.alarms:
        return ["no alarm fired" if run.diagnostics else "no diagnostics.json (diagnostics were off)"]
    return [f"step {a['step']}: {a['alarm']}: " + ", ".join(f"{k} {v:.4g}" for k, v in a["metrics"].items())
            for a in run.alarms]


def reference_line(run: RunData) -> str:
    ref = run.diagnostics.get("reference") or {}
    parts = [f"real mean MS-SSIM {ref['real_ms_ssim']:.3f}"] if "real_ms_ssim" in ref else []
    if "classifier_accuracy" in ref:
        parts.append(f"mode classifier ({ref['modes']} modes) held-out accuracy {ref['classifier_accuracy']:.3f}")
    return "; ".join(parts)


def render_html(run: RunData, run_dir: Path, grids: int) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>",
           f"<title>dcgan-report {e(str(run_dir))}</title>",
           "<style>body{font-family:sans-serif;margin:16px}svg{margin:4px}figure{display:inline-block;margin:4px}"
           "figcaption{text-align:center;font-size:12px}.alarm{color:#b00}</style></head><body>",
           f"<h1>Run {e(str(run_dir))}</h1>"]
    legend = ", ".join(f"<span style='color:{c}'>{n}</span>" for n, c in ALARM_COLOURS.items())
    out.append(f"<h2>Alarms</h2><p>Dashed vertical lines on the charts: {legend}.</p><ul>")
    out += [f"<li class='alarm'>{e(line)}</li>" for line in alarm_lines(run)]
    out.append("</ul>")
    if reference_line(run):
        out.append(f"<p>{e(reference_line(run))}</p>")
    out.append("<h2>Curves</h2><div>")
    out += [chart_svg(c) for c in charts(run)]
    out.append("</div><h2>Samples from the fixed noise over time</h2><div>")
    shown = pick_grids(run.grids, grids) + ([("real", run.real_grid)] if run.real_grid else [])
    for step, png in shown:
        buf = io.BytesIO()
        _thumbnail(png).save(buf, format="PNG", optimize=True)
        caption = "real samples" if step == "real" else f"step {step}"
        out.append(f"<figure><img width='{GRID_PX}' src='data:image/png;base64,"
                   f"{base64.b64encode(buf.getvalue()).decode()}'><figcaption>{caption}</figcaption></figure>")
    out.append("</div></body></html>")
    return "\n".join(out)


def render_png(run: RunData, run_dir: Path, grids: int) -> Image.Image:
    from dcgan_dist.imaging import font

    laid = charts(run)
    columns = 2
    pad = 12
    width = columns * CHART_W + (columns + 1) * pad
    header = [f"Run {run_dir}", *alarm_lines(run)] + ([reference_line(run)] if reference_line(run) else [])
    header_h = 10 + 18 * len(header) + 8
    rows = math.ceil(len(laid) / columns)
    shown = pick_grids(run.grids, grids) + ([("real", run.real_grid)] if run.real_grid else [])
    thumbs = [(step, _thumbnail(png)) for step, png in shown]
    per_row = max(1, (width - pad) // (GRID_PX + pad))
    grid_h = max((t.height for _, t in thumbs), default=0) + 22
    grid_rows = math.ceil(len(thumbs) / per_row)
    height = header_h + rows * (CHART_H + pad) + grid_rows * (grid_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    text_font = font(13)
    for i, line in enumerate(header):
        d.text((pad, 10 + 18 * i), line, fill="black" if i == 0 or not run.alarms else "#b00000", font=text_font)
    for i, chart in enumerate(laid):
        draw_chart(chart, canvas, (pad + (i % columns) * (CHART_W + pad), header_h + (i // columns) * (CHART_H + pad)))
    top = header_h + rows * (CHART_H + pad)
    for i, (step, thumb) in enumerate(thumbs):
        x = pad + (i % per_row) * (GRID_PX + pad)
        y = top + (i // per_row) * (grid_h + pad)
        d.text((x + GRID_PX // 2, y + 2), "real samples" if step == "real" else f"step {step}", fill="black",
               font=text_font, anchor="mt")
        canvas.paste(thumb, (x, y + 20))
    return canvas


def write_report(run_dir: Path, out: Path, grids: int = 6, real_samples: bool = True) -> Path:
    """Render `run_dir`'s report to `out` (.html or .png), written to a temporary name and renamed.

    `real_samples=False` leaves out the grid of training images: a report that goes where the data's
    licence does not (CelebA into a repository's docs) shows only what G made."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in (".html", ".png"):
        raise ReportError(f"--out {out}: expected a file name ending in .html or .png")
    run = load_run(Path(run_dir))
    if not real_samples:
        run.real_grid = None
    if kind == ".html":
        atomic_write(out, render_html(run, Path(run_dir), grids))
    else:
        # 256 colours: charts and sample grids survive it, and the page shrinks about 3x
        page = render_png(run, Path(run_dir), grids).quantize(256, method=Image.Quantize.MEDIANCUT)
        with atomic_path(out) as tmp:
            page.save(tmp, format="PNG", optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcgan-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory (run.dir of dcgan-train)")
    parser.add_argument("--out", type=Path, required=True, help="report file: .html or .png")
    parser.add_argument("--grids", type=int, default=6, help="sample grids shown over time (default %(default)s)")
    parser.add_argument("--no-real-samples", action="store_true",
                        help="leave out the grid of training images (e.g. CelebA in a figure you publish)")
    args = parser.parse_args(argv)
    if args.grids < 1:
        parser.error(f"--grids: got {args.grids}, expected at least 1")
    try:
        path = write_report(args.run, args.out, args.grids, real_samples=not args.no_real_samples)
    except ReportError as exc:
        print(f"dcgan-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"dcgan-report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
