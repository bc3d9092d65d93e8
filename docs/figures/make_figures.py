"""Figures and tables for the docs, computed by the project's own code (no plotting library needed).

Run from the repository root with the project installed (`pip install -e .`):

    python docs/figures/make_figures.py example --figure docs/figures/transposed_conv_example.png
    python docs/figures/make_figures.py shapes --ngf 64
    python docs/figures/make_figures.py checkerboard --figure docs/figures/checkerboard.png \
        --generator runs/celeba64/generator.safetensors --real /data/celeba-half-10k
    python docs/figures/make_figures.py curves runs/celeba64 --figure docs/figures/healthy_curves.png
    python docs/figures/make_figures.py samples runs/celeba64/generator.safetensors \
        --figure docs/figures/healthy_samples.png

docs/transposed_convolution.md and docs/gan_training.md show what these print and draw;
tests/test_transposed_conv_doc.py checks the docs' numbers against torch directly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from dcgan_dist.fileio import atomic_path
from dcgan_dist.imaging import font
from dcgan_dist.models import Generator

# The worked example of docs/transposed_convolution.md: a 2x2 input, a 3x3 kernel, stride 2.
EXAMPLE_INPUT = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
EXAMPLE_KERNEL = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0]])
EXAMPLE_STRIDE = 2
# The matrix view: a 1-D convolution of a length-5 signal with kernel w, stride 2, and its transpose.
MATRIX_KERNEL = torch.tensor([1.0, 2.0, 3.0])
MATRIX_Y = torch.tensor([1.0, 10.0])
# Checkerboards with even overlap (k=4, s=2, p=1): separable kernels outer(v, v) on a flat 3x3 input.
CHECKER_TAPS = {"balanced": [1.0, 3.0, 3.0, 1.0], "unbalanced": [1.0, 2.0, 3.0, 4.0]}

STAMP_COLOURS = [(230, 97, 1), (94, 60, 153), (27, 158, 119), (31, 120, 180)]
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)


def stamps(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> list[torch.Tensor]:
    """The scatter view: input pixel (i, j) adds x[i, j] * kernel at output offset (stride*i, stride*j)."""
    h, w = x.shape
    k = kernel.shape[0]
    out_h, out_w = (h - 1) * stride + k, (w - 1) * stride + k
    result = []
    for i in range(h):
        for j in range(w):
            s = torch.zeros(out_h, out_w)
            s[stride * i:stride * i + k, stride * j:stride * j + k] = x[i, j] * kernel
            result.append(s)
    return result


def format_matrix(m: torch.Tensor, blank: torch.Tensor | None = None) -> str:
    """Right-aligned integers; positions where `blank` is True print as '.' (not touched by a stamp)."""
    cells = [["." if blank is not None and blank[r, c] else f"{int(m[r, c])}" for c in range(m.shape[1])]
             for r in range(m.shape[0])]
    width = max(len(v) for row in cells for v in row)
    return "\n".join(" ".join(v.rjust(width) for v in row) for row in cells)


def example_markdown() -> str:
    """Every number block of docs/transposed_convolution.md, as fenced blocks tagged with their ids."""
    x, k, s = EXAMPLE_INPUT, EXAMPLE_KERNEL, EXAMPLE_STRIDE
    parts = [("input", format_matrix(x)), ("kernel", format_matrix(k))]
    support = stamps(torch.ones_like(x), torch.ones_like(k), s)
    for n, (stamp, mask) in enumerate(zip(stamps(x, k, s), support)):
        parts.append((f"stamp-{n // x.shape[1]}-{n % x.shape[1]}", format_matrix(stamp, mask == 0)))
    full = F.conv_transpose2d(x[None, None], k[None, None], stride=s)[0, 0]
    parts.append(("output", format_matrix(full)))
    parts.append(("overlap", format_matrix(sum(support))))
    cropped = F.conv_transpose2d(x[None, None], k[None, None], stride=s, padding=1)[0, 0]
    parts.append(("output-padding-1", format_matrix(cropped)))
    parts = [(f"example:{name}", body) for name, body in parts]

    n = 5
    C = torch.stack([F.conv1d(e.view(1, 1, n), MATRIX_KERNEL.view(1, 1, -1), stride=2).view(-1)
                     for e in torch.eye(n)], dim=1)
    parts.append(("matrix:C", format_matrix(C)))
    parts.append(("matrix:y", format_matrix(MATRIX_Y.view(1, -1))))
    ct_y = F.conv_transpose1d(MATRIX_Y.view(1, 1, -1), MATRIX_KERNEL.view(1, 1, -1), stride=2).view(1, -1)
    parts.append(("matrix:CTy", format_matrix(ct_y)))

    for name, taps in CHECKER_TAPS.items():
        v = torch.tensor(taps)
        kernel = torch.outer(v, v)
        parts.append((f"checker:{name}-kernel", format_matrix(kernel)))
        out = F.conv_transpose2d(torch.ones(1, 1, 3, 3), kernel[None, None], stride=2, padding=1)[0, 0]
        parts.append((f"checker:{name}-output", format_matrix(out)))
    return "\n\n".join(f"```text {name}\n{body}\n```" for name, body in parts)


def draw_matrix(draw: ImageDraw.ImageDraw, x0: int, y0: int, m: torch.Tensor, cell: int, title: str,
                colours: list[list[tuple[int, int, int] | None]] | None = None,
                blank: torch.Tensor | None = None) -> None:
    """A grid of numbered cells with a title above it; `colours[r][c]` fills a cell."""
    draw.text((x0, y0 - cell * 0.75), title, fill=BLACK, font=font(int(cell * 0.42)))
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell, y0 + (r + 1) * cell)
            fill = colours[r][c] if colours is not None and colours[r][c] is not None else WHITE
            draw.rectangle(box, fill=fill, outline=GREY)
            if blank is None or not blank[r, c]:
                text = f"{int(m[r, c])}"
                ink = WHITE if sum(fill) < 450 else BLACK  # light text on dark fills
                draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, fill=ink,
                          font=font(int(cell * 0.45)), anchor="mm")


def draw_example(path: Path) -> None:
    """Input, kernel, the four stamps (one colour per input pixel) and their sum, overlaps shaded grey."""
    x, k, s = EXAMPLE_INPUT, EXAMPLE_KERNEL, EXAMPLE_STRIDE
    cell, gap = 34, 30
    parts = stamps(x, k, s)
    support = stamps(torch.ones_like(x), torch.ones_like(k), s)
    n = parts[0].shape[0]
    width = 4 * n * cell + 5 * gap
    height = 3 * n * cell + 130
    img = Image.new("RGB", (width, height), WHITE)
    d = ImageDraw.Draw(img)
    in_colours = [[STAMP_COLOURS[r * x.shape[1] + c] for c in range(x.shape[1])] for r in range(x.shape[0])]
    draw_matrix(d, gap, 40, x, cell, "input x (2x2)", in_colours)
    draw_matrix(d, gap + 3 * cell + gap, 40, k, cell, "kernel K (3x3)")
    d.text((gap + 7 * cell + gap, 40 + cell), f"stride {s}, padding 0:  out[{s}i+a, {s}j+b] += x[i,j] * K[a,b]",
           fill=BLACK, font=font(16))
    y_stamps = 40 + 3 * cell + 50
    for idx, (stamp, mask) in enumerate(zip(parts, support)):
        colours = [[STAMP_COLOURS[idx] if mask[r, c] else None for c in range(n)] for r in range(n)]
        i, j = divmod(idx, x.shape[1])
        draw_matrix(d, gap + idx * (n * cell + gap), y_stamps, stamp, cell,
                    f"x[{i},{j}] = {int(x[i, j])} stamps {int(x[i, j])}*K", colours, mask == 0)
    y_out = y_stamps + n * cell + 50
    overlap = sum(support)
    out = F.conv_transpose2d(x[None, None], k[None, None], stride=s)[0, 0]
    out_colours = [[(225, 225, 225) if overlap[r, c] > 1 else None for c in range(n)] for r in range(n)]
    draw_matrix(d, gap, y_out, out, cell, "output = sum of stamps (5x5)", out_colours)
    d.rectangle((gap + cell, y_out + cell, gap + 4 * cell, y_out + 4 * cell), outline=(200, 0, 0), width=3)
    d.text((gap + n * cell + gap, y_out + cell * 0.5),
           "grey: cells two or four stamps overlap (kernel 3 is not a multiple of stride 2)\n"
           "red frame: padding=1 crops one row/column per side -> the 3x3 output",
           fill=BLACK, font=font(15), spacing=8)
    save_png(img, path)


def save_png(img: Image.Image, path: Path) -> None:
    """Write the figure whole or not at all: a failed run leaves the previous figure in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


BlockShape = tuple[nn.ConvTranspose2d, str, int, tuple[int, ...], int]


def generator_shapes(nz: int = 100, ngf: int = 64, channels: int = 3) -> list[BlockShape]:
    """Per block of G: (its transposed conv, its layer names, input height, output C x H x W, BatchNorm params)."""
    G = Generator(nz, ngf, channels)
    h = torch.zeros(2, nz, 1, 1)
    rows = []
    layers = list(G.main)
    starts = [i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d)] + [len(layers)]
    for start, end in zip(starts, starts[1:]):
        block = layers[start:end]
        h_in = h.shape[-1]
        with torch.no_grad():
            for m in block:
                h = m(h)
        names = " + ".join(type(m).__name__ for m in block)
        bn = sum(p.numel() for m in block if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
        rows.append((block[0], names, h_in, tuple(h.shape[1:]), bn))
    return rows


def shapes_markdown(nz: int, ngf: int, channels: int) -> str:
    """The per-block table of docs/transposed_convolution.md: shapes by the formula and by running G."""
    lines = ["| block | layers | H_out by the formula | output C x H x W | conv weights | BatchNorm | parameters |",
             "|---|---|---|---|---|---|---|",
             f"| input | z | | {nz} x 1 x 1 | | | |"]
    total = 0
    for n, (conv, names, h_in, shape, bn) in enumerate(generator_shapes(nz, ngf, channels), 1):
        s, p, d, k, op = conv.stride[0], conv.padding[0], conv.dilation[0], conv.kernel_size[0], conv.output_padding[0]
        h_out = (h_in - 1) * s - 2 * p + d * (k - 1) + op + 1
        assert h_out == shape[-1], (h_out, shape)  # the formula and the run agree, or the table is not printed
        formula = f"({h_in} - 1)*{s} - 2*{p} + {d}*({k} - 1) + {op} + 1 = {h_out}"
        weights = conv.weight.numel()
        total += weights + bn
        lines.append(f"| {n} | {names} ({conv.in_channels} -> {conv.out_channels}, k{k} s{s} p{p}) | {formula} "
                     f"| {' x '.join(map(str, shape))} | {weights:,} | {bn:,} | {weights + bn:,} |")
    lines.append(f"| | total | | | | | {total:,} |")
    return "\n".join(lines)


def nyquist_share(images: torch.Tensor) -> float:
    """Mean share of each image's (mean-removed) energy on the period-2 frequencies: a checkerboard meter."""
    x = images.float() - images.float().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2
    h, w = x.shape[-2:]
    nyq = power[..., h // 2, :].sum(-1) + power[..., :, w // 2].sum(-1) - power[..., h // 2, w // 2]
    return (nyq / power.sum(dim=(-2, -1)).clamp_min(1e-20)).mean().item()


def to_pil(images: torch.Tensor, nrow: int, scale: int) -> Image.Image:
    """[-1, 1] images -> one PIL grid, enlarged `scale` times with nearest neighbour (pixels stay visible)."""
    from dcgan_dist.metrics import image_grid

    grid = image_grid(images, nrow=nrow)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(pixels)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def overlap_map(kernel: int, stride: int, padding: int, size: int = 6) -> torch.Tensor:
    """How many kernel taps land on each output pixel: a transposed conv of ones with a ones kernel."""
    return F.conv_transpose2d(torch.ones(1, 1, size, size), torch.ones(1, 1, kernel, kernel),
                              stride=stride, padding=padding)[0, 0]


def image_sets(generator: Path | None, real: Path | None, samples: int = 64,
               seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """[-1, 1] images to compare: G at initialisation, a trained G export, real images (each when given)."""
    z = torch.randn(samples, 100, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    with torch.no_grad():
        sets = [("G at initialisation", Generator().train()(z))]  # training-mode BatchNorm, as in a step
    if generator is not None:
        from dcgan_dist.checkpoint import load_generator

        trained = load_generator(generator)
        z_trained = torch.randn(samples, trained.nz, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            sets.append(("trained G", trained(z_trained)))
    if real is not None:
        from dcgan_dist.data.images import lab_transform, list_images

        transform = lab_transform(64)
        files = list_images(real)[:samples]
        if not files:
            raise SystemExit(f"make_figures: {real}: no images found, expected a folder of images")
        images = []
        for f in files:
            with Image.open(f) as im:
                images.append(transform(im.convert("RGB")))
        sets.append(("real images", torch.stack(images).float() / 127.5 - 1))
    return sets


def log_spectrum(images: torch.Tensor, decades: float = 5.0) -> torch.Tensor:
    """Mean power spectrum (mean removed), centred, log scale over `decades`, as a grey [-1, 1] image."""
    x = images.float() - images.float().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fftshift((torch.fft.fft2(x).abs() ** 2).mean(dim=(0, 1))).clamp_min(1e-30).log10()
    grey = ((power - power.max() + decades) / decades).clamp(0, 1) * 2 - 1
    return grey[None, None].expand(1, 3, -1, -1)


def draw_checkerboard(path: Path, sets: list[tuple[str, torch.Tensor]]) -> None:
    """Tap-overlap maps of (k3, s2) and (k4, s2, p1), then each image set's power spectrum."""
    panels: list[tuple[str, Image.Image]] = []
    for k, s, p in ((3, 2, 0), (4, 2, 1)):
        m = overlap_map(k, s, p)
        grey = (m / m.max() * 2 - 1)[None, None].expand(1, 3, -1, -1)
        panels.append((f"taps per output pixel\nk={k} s={s} p={p} (dark 1, white {int(m.max())})",
                       to_pil(grey, 1, 12)))
    for name, images in sets:
        panels.append((f"{name}: log power spectrum\n(centre: smooth; edges: period 2)",
                       to_pil(log_spectrum(images), 1, 3)))
    gap, top = 24, 56
    title_font = font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(im.width, int(probe.multiline_textbbox((0, 0), t, font=title_font)[2])) for t, im in panels]
    width = sum(widths) + gap * (len(panels) + 1)
    height = max(im.height for _, im in panels) + top + gap
    img = Image.new("RGB", (width, height), WHITE)
    d = ImageDraw.Draw(img)
    x = gap
    for (title, im), w in zip(panels, widths):
        d.multiline_text((x, 8), title, fill=BLACK, font=title_font, spacing=4)
        img.paste(im, (x, top))
        x += w + gap
    save_png(img, path)


def checkerboard_report(sets: list[tuple[str, torch.Tensor]]) -> None:
    """Print each set's share of energy on the period-2 frequencies (white noise for scale)."""
    for name, images in sets:
        print(f"{nyquist_share(images):8.2%}  {name}")
    h = 64
    print(f"{(2 * h - 1) / h**2:8.2%}  white noise (expected: {2 * h - 1} of {h * h} frequencies)")


def draw_curves(run_dir: Path, path: Path) -> None:
    """dcgan-report's loss and D-output charts of a run, alone (its full page also shows real images)."""
    from dcgan_dist.report import CHART_H, CHART_W, PANELS, ReportError, draw_chart, layout, load_run

    try:
        run = load_run(run_dir)
    except ReportError as exc:
        raise SystemExit(f"make_figures: {exc}") from None
    wanted = [p for p in PANELS if {"loss/D", "D(x)"} & set(p.tags)]
    laid = [c for c in (layout(p, run) for p in wanted) if c is not None]
    if not laid:
        raise SystemExit(f"make_figures: {run_dir}: no loss/D or D(x) scalars in its TensorBoard events")
    pad = 12
    img = Image.new("RGB", (len(laid) * (CHART_W + pad) + pad, CHART_H + 2 * pad), WHITE)
    for i, chart in enumerate(laid):
        draw_chart(chart, img, (pad + i * (CHART_W + pad), pad))
    save_png(img, path)


def draw_samples(generator: Path, path: Path, count: int = 16, seed: int = 0) -> None:
    """A grid of a trained generator's samples (eval mode, as in images/fake_fixed_noise), enlarged twice."""
    from dcgan_dist.checkpoint import load_generator

    G = load_generator(generator)
    with torch.no_grad():
        images = G(torch.randn(count, G.nz, generator=torch.Generator().manual_seed(seed)))
    save_png(to_pil(images, 8, 2), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/figures/make_figures.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("example", help="print the transposed-convolution worked example; draw it with --figure")
    ex.add_argument("--figure", type=Path)
    sh = sub.add_parser("shapes", help="print the generator's per-block output shapes and parameter counts")
    sh.add_argument("--nz", type=int, default=100)
    sh.add_argument("--ngf", type=int, default=64)
    sh.add_argument("--channels", type=int, default=3)
    cb = sub.add_parser("checkerboard", help="period-2 energy of G's samples; overlap maps with --figure")
    cb.add_argument("--figure", type=Path)
    cb.add_argument("--generator", type=Path, help="a trained generator export, RUN/generator.safetensors")
    cb.add_argument("--real", type=Path, help="a folder of real images to compare with")
    cu = sub.add_parser("curves", help="draw a run's loss and D(x) / D(G(z)) charts (dcgan-report's, without images)")
    cu.add_argument("run_dir", type=Path)
    cu.add_argument("--figure", type=Path, required=True)
    sa = sub.add_parser("samples", help="draw a grid of samples from a trained generator export")
    sa.add_argument("generator", type=Path, help="RUN/generator.safetensors")
    sa.add_argument("--figure", type=Path, required=True)
    args = parser.parse_args(argv)
    generator = getattr(args, "generator", None)
    if generator is not None and not generator.is_file():
        parser.error(f"{generator}: not found, expected a generator export such as runs/NAME/generator.safetensors")
    real = getattr(args, "real", None)
    if real is not None and not real.is_dir():
        parser.error(f"{real}: not a folder, expected a folder of images such as /data/celeba/img_align_celeba")
    if args.command == "example":
        print(example_markdown())
        if args.figure:
            draw_example(args.figure)
    elif args.command == "shapes":
        print(shapes_markdown(args.nz, args.ngf, args.channels))
    elif args.command == "checkerboard":
        sets = image_sets(args.generator, args.real)
        checkerboard_report(sets)
        if args.figure:
            draw_checkerboard(args.figure, sets)
    elif args.command == "curves":
        draw_curves(args.run_dir, args.figure)
    elif args.command == "samples":
        draw_samples(args.generator, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
