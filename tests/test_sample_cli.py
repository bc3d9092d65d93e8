"""dcgan-sample: grids that torchvision's save_image reproduces, PNG files of the stated count and size,
interpolations, explicit BatchNorm statistics, one-line errors, and a --help that does not import torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from dcgan_dist.checkpoint import export_generator, load_generator
from dcgan_dist.models import Generator, sample_with_batch_statistics
from dcgan_dist.quality.generator import generate_with_statistics_of, slerp, to_uint8
from dcgan_dist.quality.sample import main

REPO = Path(__file__).resolve().parents[1]
NZ = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with a generator export whose BatchNorm buffers differ from a fresh model's."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    G = Generator(nz=NZ, ngf=8)
    G.train()
    with torch.no_grad():
        for _ in range(3):
            G(torch.randn(32, NZ, 1, 1) * 2)  # moves the running statistics away from (0, 1)
    export_generator(G, run / "generator.safetensors", {"nz": NZ, "ngf": 8})
    return run


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def latents(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, NZ, 1, 1, generator=torch.Generator().manual_seed(seed))


def test_grid_is_make_grid_of_the_same_samples(run_dir, tmp_path):
    assert main([str(run_dir), "--grid", str(tmp_path / "grid.png"), "--n", "10", "--nrow", "4", "--seed", "3"]) == 0
    G = load_generator(run_dir / "generator.safetensors")
    images = sample_with_batch_statistics(G, latents(10, 3))  # one batch of 10, training-mode BatchNorm
    save_image((images + 1) / 2, tmp_path / "expected.png", nrow=4, padding=2)  # make_grid, then rounding
    got = pixels(tmp_path / "grid.png")
    assert got.shape == (3 * 66 + 2, 4 * 66 + 2, 3)
    np.testing.assert_array_equal(got, pixels(tmp_path / "expected.png"))


def test_running_statistics_are_eval_mode(run_dir, tmp_path):
    assert main([str(run_dir), "--grid", str(tmp_path / "eval.png"), "--n", "4", "--bn", "running"]) == 0
    assert main([str(run_dir), "--grid", str(tmp_path / "batch.png"), "--n", "4"]) == 0
    G = load_generator(run_dir / "generator.safetensors").eval()
    with torch.no_grad():
        save_image((G(latents(4, 0)) + 1) / 2, tmp_path / "expected.png", nrow=8, padding=2)
    np.testing.assert_array_equal(pixels(tmp_path / "eval.png"), pixels(tmp_path / "expected.png"))
    assert np.abs(pixels(tmp_path / "eval.png").astype(int) - pixels(tmp_path / "batch.png")).mean() > 1


def test_count_writes_that_many_64px_pngs_in_batches(run_dir, tmp_path):
    out = tmp_path / "samples"
    assert main([str(run_dir / "generator.safetensors"), "--count", "7", "--out-dir", str(out), "--batch-size", "4",
                 "--seed", "5"]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(7)]
    assert all(Image.open(f).size == (64, 64) and Image.open(f).mode == "RGB" for f in files)
    G = load_generator(run_dir / "generator.safetensors")
    second_batch = sample_with_batch_statistics(G, latents(7, 5)[4:])  # images 4..6 were normalised together
    save_image((second_batch[1] + 1) / 2, tmp_path / "expected.png")
    np.testing.assert_array_equal(pixels(files[5]), pixels(tmp_path / "expected.png"))


def test_interpolation_png_rows_and_gif_loop(run_dir, tmp_path):
    assert main([str(run_dir), "--interpolate", "3", "--frames", "4", "--out", str(tmp_path / "walk.png")]) == 0
    grid = pixels(tmp_path / "walk.png")
    assert grid.shape == (2 * 66 + 2, 4 * 66 + 2, 3)  # one row per step, endpoints included

    def tile(row: int, col: int) -> np.ndarray:
        return grid[2 + 66 * row:66 * (row + 1), 2 + 66 * col:66 * (col + 1)]

    np.testing.assert_array_equal(tile(0, 3), tile(1, 0))  # z2 ends row 1 and starts row 2
    assert not np.array_equal(tile(0, 0), tile(0, 3))

    # each frame is normalised with the reference batch's statistics, not its neighbours': z1 looks the
    # same whatever path it starts (a batch of frames would normalise it differently with 6 frames than with 4)
    assert main([str(run_dir), "--interpolate", "3", "--frames", "6", "--out", str(tmp_path / "long.png")]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "long.png")[2:66, 2:66], tile(0, 0))

    assert main([str(run_dir), "--interpolate", "3", "--frames", "4", "--out", str(tmp_path / "walk.gif")]) == 0
    with Image.open(tmp_path / "walk.gif") as gif:
        assert (gif.n_frames, gif.size, gif.info["loop"]) == (12, (64, 64), 0)  # z1 -> z2 -> z3 -> z1


def test_reference_statistics_normalise_like_a_member_of_the_reference_batch(run_dir):
    G = load_generator(run_dir / "generator.safetensors")
    before = {k: v.clone() for k, v in G.state_dict().items()}
    reference = latents(16, 9)
    alone = generate_with_statistics_of(G, reference[3:5], reference)  # two latents, normalised as batch members
    in_batch = to_uint8(sample_with_batch_statistics(G, reference))[3:5]
    assert (alone.int() - in_batch.int()).abs().max() <= 1  # eval- vs train-mode arithmetic: at most a rounding step
    for key, value in G.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # running statistics restored


def test_slerp_follows_the_great_circle():
    a, b = torch.zeros(2, 1, 1), torch.zeros(2, 1, 1)
    a[0], b[1] = 3.0, 3.0  # orthogonal, equal norms
    path = slerp(a, b, torch.tensor([0.0, 1 / 3, 0.5, 1.0]))
    assert path.shape == (4, 2, 1, 1)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.flatten(1).norm(dim=1), torch.full((4,), 3.0))  # a line would dip to 2.12
    torch.testing.assert_close(path[1].flatten(), 3 * torch.tensor([np.cos(np.pi / 6), np.sin(np.pi / 6)]).float())


@pytest.mark.parametrize("args, expected", [
    (["RUN", "--weights", "ema", "--grid", "OUT/g.png"], "this run keeps no moving average of G"),
    (["RUN/generator.safetensors", "--weights", "ema", "--grid", "OUT/g.png"], "is a file, pass it without --weights"),
    (["OUT/missing", "--grid", "OUT/g.png"], "no such file or run directory"),
    (["RUN/not-a-generator.txt", "--grid", "OUT/g.png"], "not a dcgan_dist generator export"),
    (["RUN", "--grid", "OUT/g.jpg"], "--grid OUT/g.jpg: expected a .png file name"),
    (["RUN", "--interpolate", "1", "--out", "OUT/w.png"], "--interpolate: got 1, expected at least 2"),
    (["RUN", "--interpolate", "3"], "--interpolate: needs --out"),
    (["RUN", "--interpolate", "3", "--out", "OUT/w.mp4"], "expected a .png or .gif"),
    (["RUN", "--count", "3"], "--count needs a folder"),
    (["RUN", "--count", "3", "--out-dir", "RUN"], "not an empty folder"),
    (["RUN", "--grid", "OUT/g.png", "--out-dir", "OUT/d"], "--out-dir: only with --count"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys, args, expected):
    (run_dir / "not-a-generator.txt").write_text("hello")
    args = [a.replace("RUN", str(run_dir)).replace("OUT", str(tmp_path)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected.replace("OUT", str(tmp_path)) in err[0], err
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("module", ["dcgan_dist.quality.sample", "dcgan_dist.quality.evaluate"])
def test_help_does_not_import_torch(module):
    code = (f"import sys\nfrom {module} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stderr
    assert "usage:" in out.stdout
