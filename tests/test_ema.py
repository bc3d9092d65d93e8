"""G's moving average: the ramped decay against a recomputation in plain torch from the recorded raw
weights, decay 0 as an exact copy, the trainer without an average, and an average started at a resume."""
from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dcgan_dist.checkpoint import EMA_FILE, GENERATOR_EXPORT, RAW_GENERATOR_EXPORT, export_weights, latest_checkpoint
from dcgan_dist.config import LossConfig, load_config
from dcgan_dist.ema import GeneratorEMA, ema_beta, half_life_steps
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.step import GANStep
from dcgan_dist.train import train

TINY = ["model.ngf=8", "model.ndf=8", "model.nz=16", "train.batch_size=8", "data.workers=1", "log.every=5",
        "log.images_every=10", "ckpt.every=10", "ckpt.keep=2", "diag.enabled=false"]


def gan_step(ema_decay: float, ema_rampup: float) -> GANStep:
    torch.manual_seed(0)
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    acc = Accelerator(cpu=True)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999), fused=True)  # 10x the lab's: visible moves
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    return GANStep(acc, G, D, opt_g, opt_d, LossConfig(), nz=16, seed=0, ema_decay=ema_decay, ema_rampup=ema_rampup)


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_average_after_n_steps_is_the_ramped_exponential_average_of_the_raw_weights():
    # decay 0.5: half-life 1 step; ramp 0.3: the half-life is 0, 0.3, 0.6, 0.9 steps at the first four
    # updates, then capped at 1: both regimes in six steps
    step = gan_step(ema_decay=0.5, ema_rampup=0.3)
    G = step.accelerator.unwrap_model(step.G)
    recorded = []  # G's parameters after each step's update, which the step averages
    for i in range(6):
        step(batch(i))
        recorded.append([p.detach().double().clone() for p in G.parameters()])
    average = None
    for t, weights in enumerate(recorded):  # StyleGAN2-ADA: ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
        half_life = min(math.log(0.5) / math.log(0.5), t * 0.3)  # H = ln 0.5 / ln decay = 1
        beta = 0.5 ** (1 / max(half_life, 1e-8))
        average = weights if average is None else [beta * a + (1 - beta) * w for a, w in zip(average, weights)]
    assert [round(ema_beta(t, 0.5, 0.3), 12) for t in (0, 1, 4, 5)] == [0.0, round(0.5 ** (1 / 0.3), 12), 0.5, 0.5]
    moved = 0.0
    for a, e, w in zip(average, step.ema.model.parameters(), recorded[-1]):
        torch.testing.assert_close(e.double(), a, rtol=0, atol=1e-6)
        moved = max(moved, float((a - w).abs().max()))
    assert moved > 1e-4  # the average is not simply the last weights
    for e, b in zip(step.ema.model.buffers(), G.buffers()):  # BatchNorm's buffers: copied, not averaged
        assert torch.equal(e, b)
    assert step.ema.updates.item() == 6


def test_decay_zero_keeps_an_exact_copy_and_without_a_ramp_beta_is_the_decay():
    G = Generator(nz=16, ngf=8)
    ema = GeneratorEMA(G, decay=0.0, rampup=0.0)
    for i in range(3):
        with torch.no_grad():
            for p in G.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            G(torch.randn(4, 16))  # moves BatchNorm's running statistics
        ema.update()
        assert all(torch.equal(e, g) for e, g in zip(ema.model.state_dict().values(), G.state_dict().values()))
    steady = GeneratorEMA(G, decay=0.999, rampup=0.0)
    assert steady.beta().item() == pytest.approx(0.999, abs=1e-15)
    assert half_life_steps(0.999) == pytest.approx(692.8, abs=0.1)


def test_the_config_turns_the_average_off_and_a_resume_starts_it_from_the_loaded_g(tmp_path, image_folder, capsys):
    cfg = load_config(None, [*TINY, f"data.source={image_folder}", f"run.dir={tmp_path}", "train.max_steps=4",
                             "model.ema_decay=0"])
    train(cfg)
    ckpt = latest_checkpoint(tmp_path)
    assert not (ckpt / EMA_FILE).exists() and not (tmp_path / RAW_GENERATOR_EXPORT).exists()
    assert export_weights(tmp_path / GENERATOR_EXPORT) == "raw"
    assert torch.load(ckpt / "state.pt", weights_only=True)["ema_updates"] is None
    # the same run resumed with the average on (the default): it starts from the checkpoint's G
    train(load_config(None, [*TINY, f"data.source={image_folder}", f"run.dir={tmp_path}", "train.max_steps=6"]))
    assert "holds no moving average of G: it starts from the loaded G" in capsys.readouterr().out
    ckpt = latest_checkpoint(tmp_path)
    assert torch.load(ckpt / "state.pt", weights_only=True)["ema_updates"].item() == 2
    # the ramp restarted at the resume: update 0 copied G, update 1 has half-life 0.05 steps, beta 0.5^20,
    # so the average is G at step 6 within 1e-6 of a step's move (a count continued from 4 would give beta 0.03)
    ema, raw = load_file(str(ckpt / EMA_FILE)), load_file(str(ckpt / "G.safetensors"))
    assert export_weights(tmp_path / GENERATOR_EXPORT) == "ema"
    for k in raw:
        torch.testing.assert_close(ema[k], raw[k], rtol=0, atol=1e-8)


def test_weights_flag_picks_the_export_that_holds_those_weights(tmp_path):
    from dcgan_dist.checkpoint import export_generators
    from dcgan_dist.quality import QualityError
    from dcgan_dist.quality.generator import weights_file

    G, G_ema = Generator(nz=16, ngf=8), Generator(nz=16, ngf=8)
    config = {"nz": 16, "ngf": 8}
    export_generators(tmp_path, G, G_ema, config)
    assert weights_file(tmp_path, None) == weights_file(tmp_path, "ema") == tmp_path / GENERATOR_EXPORT
    assert weights_file(tmp_path, "raw") == tmp_path / RAW_GENERATOR_EXPORT
    assert torch.equal(load_file(str(tmp_path / GENERATOR_EXPORT))["main.0.weight"], G_ema.main[0].weight)
    # the same run folder later exported without an average: no stale raw file, and no EMA to ask for
    export_generators(tmp_path, G, None, config)
    assert not (tmp_path / RAW_GENERATOR_EXPORT).exists()
    assert weights_file(tmp_path, None) == weights_file(tmp_path, "raw") == tmp_path / GENERATOR_EXPORT
    with pytest.raises(QualityError, match="keeps no moving average of G"):
        weights_file(tmp_path, "ema")
