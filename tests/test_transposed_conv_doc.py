"""docs/transposed_convolution.md: every number block, the formula and the shape table, recomputed with torch.

The doc's numbers are parsed from its fenced blocks (```text <id>) and its table, so editing a number there
breaks a test. Expected values come from torch directly (and from running the project's Generator), never from
docs/figures/make_figures.py, which printed them.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcgan_dist.models import Generator, count_parameters

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "transposed_convolution.md"
FA_DOC = REPO / "docs" / "fa" / "README.md"  # the Persian guide repeats the worked example, formula and table
BOTH = pytest.mark.parametrize("doc", [DOC, FA_DOC], ids=["en", "fa"])
FIGURE_DOCS = [DOC, REPO / "docs" / "gan_training.md", FA_DOC]


def doc_blocks(path: Path) -> dict[str, str]:
    found = re.findall(r"^```text (\S+)\n(.*?)\n```$", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    ids = [name for name, _ in found]
    assert len(ids) == len(set(ids)), f"duplicate block ids in {path}: {ids}"
    return dict(found)


def parse_matrix(body: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Numbers of a block as a float tensor, and a mask of its '.' (untouched) positions, which read as 0."""
    rows = [line.split() for line in body.strip().splitlines()]
    assert len({len(r) for r in rows}) == 1, f"ragged matrix block:\n{body}"
    values = torch.tensor([[0.0 if v == "." else float(v) for v in r] for r in rows])
    blank = torch.tensor([[v == "." for v in r] for r in rows])
    return values, blank


def block(blocks: dict[str, str], name: str) -> torch.Tensor:
    assert name in blocks, f"lost the ```text {name} block"
    return parse_matrix(blocks[name])[0]


@BOTH
def test_worked_example_matches_conv_transpose2d(doc):
    blocks = doc_blocks(doc)
    x, k = block(blocks, "example:input"), block(blocks, "example:kernel")
    assert x.shape == (2, 2) and k.shape == (3, 3)
    x4, k4 = x[None, None], k[None, None]
    full = F.conv_transpose2d(x4, k4, stride=2)[0, 0]
    assert torch.equal(block(blocks, "example:output"), full)
    assert torch.equal(block(blocks, "example:output-padding-1"), F.conv_transpose2d(x4, k4, stride=2, padding=1)[0, 0])
    overlap = F.conv_transpose2d(torch.ones_like(x4), torch.ones_like(k4), stride=2)[0, 0]
    assert torch.equal(block(blocks, "example:overlap"), overlap)
    # Each stamp is the transposed conv of the input with all but one pixel zeroed; '.' marks exactly
    # the positions that pixel's kernel does not reach.
    total = torch.zeros_like(full)
    for i, j in itertools.product(range(2), range(2)):
        values, blank = parse_matrix(blocks[f"example:stamp-{i}-{j}"])
        one = torch.zeros_like(x4)
        one[0, 0, i, j] = x[i, j]
        assert torch.equal(values, F.conv_transpose2d(one, k4, stride=2)[0, 0]), (i, j)
        reach = torch.zeros_like(x4)
        reach[0, 0, i, j] = 1
        assert torch.equal(blank, F.conv_transpose2d(reach, torch.ones_like(k4), stride=2)[0, 0] == 0), (i, j)
        total += values
    assert torch.equal(total, full)


@BOTH
def test_output_size_formula_as_written_matches_torch(doc):
    lhs, _, rhs = doc_blocks(doc)["formula"].partition("=")
    assert lhs.strip() == "H_out"
    assert re.fullmatch(r"[\w\s()+\-*]+", rhs), rhs
    expression = compile(rhs.strip(), "formula", "eval")
    checked = 0
    for h_in, stride, padding, dilation, kernel in itertools.product((1, 2, 5), (1, 2, 3), (0, 1), (1, 2), (2, 3, 4)):
        for output_padding in range(max(stride, dilation)):
            names = dict(H_in=h_in, stride=stride, padding=padding, dilation=dilation, kernel=kernel,
                         output_padding=output_padding)
            predicted = eval(expression, {"__builtins__": {}}, names)  # noqa: S307 - arithmetic from our own doc
            if predicted <= 0:
                continue
            out = F.conv_transpose2d(torch.zeros(1, 1, h_in, h_in), torch.zeros(1, 1, kernel, kernel), stride=stride,
                                     padding=padding, dilation=dilation, output_padding=output_padding)
            assert out.shape[-1] == predicted, names
            checked += 1
    assert checked > 150


def shape_table_rows(doc: Path) -> list[list[str]]:
    """The cells of the first table whose header mentions H_out."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("|") and "H_out" in line)
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


@BOTH
def test_shape_table_matches_the_generator_run_block_by_block(doc):
    rows = shape_table_rows(doc)
    assert rows[0][2:4] == ["", "100 x 1 x 1"], rows[0]
    body, total_row = rows[1:-1], rows[-1]
    torch.manual_seed(0)
    G = Generator()  # the lab's width: nz 100, ngf 64
    layers = list(G.main)
    starts = [i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d)]
    assert len(body) == len(starts) == 5
    h = torch.randn(2, 100, 1, 1)
    for row, start, end in zip(body, starts, starts[1:] + [len(layers)]):
        conv = layers[start]
        h_in = h.shape[-1]
        with torch.no_grad():
            for m in layers[start:end]:
                h = m(h)
        formula, _, result = row[2].rpartition("=")
        assert re.fullmatch(r"[\d\s()+\-*]+", formula), row
        assert eval(formula, {"__builtins__": {}}) == int(result) == h.shape[-1], row  # noqa: S307
        assert formula.strip().startswith(f"({h_in} - 1)*{conv.stride[0]} - 2*{conv.padding[0]}"), row
        assert row[3] == " x ".join(map(str, h.shape[1:])), row
        weights = conv.in_channels * conv.out_channels * 4 * 4
        bn = sum(2 * m.num_features for m in layers[start:end] if isinstance(m, nn.BatchNorm2d))
        assert [int(v.replace(",", "")) for v in row[4:7]] == [weights, bn, weights + bn], row
        assert f"({conv.in_channels} -> {conv.out_channels}, k4 s{conv.stride[0]} p{conv.padding[0]})" in row[1], row
    assert h.shape[1:] == (3, 64, 64)
    assert int(total_row[-1].replace(",", "")) == count_parameters(G) == 3_576_704


def test_transposed_conv_is_the_adjoint_and_the_input_gradient_of_conv():
    g = torch.Generator().manual_seed(0)
    for stride, padding, kernel, size in ((2, 1, 4, 16), (2, 0, 3, 15), (1, 0, 4, 16)):
        W = torch.randn(8, 3, kernel, kernel, generator=g, dtype=torch.float64)
        x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64, requires_grad=True)
        conv = F.conv2d(x, W, stride=stride, padding=padding)
        y = torch.randn(conv.shape, generator=g, dtype=torch.float64)
        transposed = F.conv_transpose2d(y, W, stride=stride, padding=padding)
        assert transposed.shape == x.shape  # sizes the strided conv reads whole: no output_padding needed
        torch.testing.assert_close((conv * y).sum(), (x * transposed).sum())
        (grad,) = torch.autograd.grad(conv, x, y)
        torch.testing.assert_close(grad, transposed)


def test_matrix_view_blocks():
    blocks = doc_blocks(DOC)
    w = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3)  # the doc's prose: w = [1, 2, 3], stride 2, length 5
    assert "kernel `w = [1, 2, 3]`, stride 2" in DOC.read_text(encoding="utf-8")
    C = torch.stack([F.conv1d(e.view(1, 1, 5), w, stride=2).view(-1) for e in torch.eye(5)], dim=1)
    assert torch.equal(block(blocks, "matrix:C"), C)
    y = block(blocks, "matrix:y").view(-1)
    ct_y = block(blocks, "matrix:CTy").view(-1)
    assert torch.equal(ct_y, C.T @ y)
    assert torch.equal(ct_y, F.conv_transpose1d(y.view(1, 1, -1), w, stride=2).view(-1))


@pytest.mark.parametrize("name, taps", [("balanced", [1.0, 3.0, 3.0, 1.0]), ("unbalanced", [1.0, 2.0, 3.0, 4.0])])
def test_checkerboard_blocks(name, taps):
    blocks = doc_blocks(DOC)
    v = torch.tensor(taps)
    assert f"`outer({[int(t) for t in taps]})`" in DOC.read_text(encoding="utf-8")
    kernel = block(blocks, f"checker:{name}-kernel")
    assert torch.equal(kernel, torch.outer(v, v))
    out = F.conv_transpose2d(torch.ones(1, 1, 3, 3), kernel[None, None], stride=2, padding=1)[0, 0]
    assert torch.equal(block(blocks, f"checker:{name}-output"), out)
    interior = out[1:-1, 1:-1]
    # the claim of the prose: flat interior for the balanced kernel, a period-2 pattern for the other
    assert (interior.unique().numel() == 1) == (name == "balanced")


@pytest.mark.parametrize("doc", FIGURE_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_figures_exist_and_are_small(doc):
    if not doc.is_file():
        pytest.fail(f"{doc} is missing")
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", doc.read_text(encoding="utf-8"))
    assert figures, f"{doc} shows no figure"
    for rel in figures:
        path = (doc.parent / rel).resolve()
        assert path.is_file(), f"{doc.name}: {rel} does not exist"
        assert path.stat().st_size < 300_000, f"{rel}: {path.stat().st_size} bytes, expected < 300 KB"
