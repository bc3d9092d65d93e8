"""Skipped steps without a host sync: fp16 loss-scaler skips, non-finite losses, and the max_nonfinite stop."""
from __future__ import annotations

import hashlib

import pytest
import torch
from accelerate import Accelerator

from dcgan_dist.checkpoint import checkpoint_dirs
from dcgan_dist.config import ConfigError, LossConfig, load_config
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.parallel import build_accelerator
from dcgan_dist.step import LAST_STEP_NONFINITE, NONFINITE_LIMIT_REACHED, GANStep
from dcgan_dist.train import main

INIT_SCALE = 2.0 ** 10


def make_step(scaler: torch.amp.GradScaler | None = None):
    """GANStep on CPU; with `scaler`, the fp16 path (Accelerate only builds a CUDA scaler, so it is handed one)."""
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    acc.scaler = scaler  # read by prepare() (optimizer wrappers) and backward()
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    return GANStep(acc, G, D, opt_g, opt_d, LossConfig(), nz=16, seed=0), G, D


def images(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def adam_steps(opt) -> list[float]:
    return [float(s["step"]) for s in opt.optimizer.state.values()]


def counts(step: GANStep) -> dict[str, float]:
    """The skip counters of the interval since the last call (resets every statistic)."""
    return {k: float(v) for k, v in step.stats.take().items() if k in ("amp/skipped_steps", "train/nonfinite_steps")}


def flags(step: GANStep, limit: int) -> list[float]:
    named = step.nonfinite_flags(limit)
    return [float(named[NONFINITE_LIMIT_REACHED]), float(named[LAST_STEP_NONFINITE])]


def test_fp16_overflow_skips_only_that_update_counts_it_and_halves_the_scale():
    step, G, D = make_step(torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))
    step(images(0))
    assert step.loss_scale() == INIT_SCALE
    step.stats.take()
    g0, d0, d_steps = snapshot(G), snapshot(D), adam_steps(step.opt_d)
    # an infinite gradient in D's last layer during the next D backward only
    weight = step.D_bare.main[-1].weight
    handle = weight.register_hook(lambda g: g * float("inf"))
    step(images(1))
    handle.remove()
    assert unchanged(D, d0) and adam_steps(step.opt_d) == d_steps  # D's update and its Adam step count skipped
    assert not unchanged(G, g0)  # G's own step went ahead
    assert step.loss_scale() == INIT_SCALE / 2  # GradScaler's backoff after one overflow
    assert counts(step) == {"amp/skipped_steps": 1.0, "train/nonfinite_steps": 0.0}  # one skipped update, no bad loss
    d1 = snapshot(D)
    step(images(2))
    assert not unchanged(D, d1) and counts(step) == {"amp/skipped_steps": 0.0, "train/nonfinite_steps": 0.0}


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_nonfinite_loss_skips_both_updates_and_is_counted(bad):
    step, G, D = make_step()
    step(images(0))
    finite_means = step.stats.take()
    g0, d0 = snapshot(G), snapshot(D)
    steps_before = adam_steps(step.opt_d) + adam_steps(step.opt_g)
    # +inf logits give an infinite BCE whose gradients are finite: the step must still be skipped
    handle = step.D_bare.register_forward_hook(lambda m, i, out: out + float(bad))
    step(images(1))
    handle.remove()
    assert unchanged(G, g0) and unchanged(D, d0)
    assert adam_steps(step.opt_d) + adam_steps(step.opt_g) == steps_before
    assert flags(step, limit=1) == [1.0, 1.0]
    taken = step.stats.take()
    assert "amp/skipped_steps" not in taken and float(taken.pop("train/nonfinite_steps")) == 1.0
    assert all(torch.isnan(v) for v in taken.values())  # no finite step in this interval: NaN, not a made-up 0
    step(images(2))
    assert not unchanged(G, g0) and not unchanged(D, d0)
    assert flags(step, limit=2) == [0.0, 0.0]  # streak reset; the longest was 1
    means = step.stats.take()
    assert means.keys() == finite_means.keys() and all(torch.isfinite(v) for v in means.values())


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, image_folder, capsys):
    tiny = ["model.ngf=8", "model.ndf=8", "model.nz=16", "train.batch_size=8", "data.workers=0",
            f"data.source={image_folder}", f"run.dir={tmp_path}", "log.every=1", "ckpt.every=2", "ckpt.keep=5"]
    assert main([*tiny, "train.max_steps=4"]) == 0
    good = {p.name: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in p.iterdir()}
            for p in checkpoint_dirs(tmp_path)}
    assert list(good) == ["step-00000002", "step-00000004"]
    capsys.readouterr()
    # resumed with absurd learning rates: D's first update explodes and every later loss is non-finite
    code = main([*tiny, "train.max_steps=40", "train.max_nonfinite=3", "optim.lr_d=1e30", "optim.lr_g=1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == ("dcgan-train: error: step 7: 3 consecutive steps had a non-finite loss or gradient "
                       f"(train.max_nonfinite) and were skipped; last good checkpoint: {tmp_path}/checkpoints/"
                       "step-00000004; try lower optim.lr_g/lr_d or precision=bf16")
    after = {p.name: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in p.iterdir()}
             for p in checkpoint_dirs(tmp_path)}
    assert after == good


def test_fp16_on_cpu_is_a_clear_error_and_bf16_runs_with_fp32_losses():
    with pytest.raises(ConfigError, match="config key 'precision': got 'fp16' on cpu, expected a CUDA GPU"):
        build_accelerator(load_config(None, ["precision=fp16"]))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = build_accelerator(load_config(None, ["precision=bf16"]))
    torch.manual_seed(0)
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    opt_g = torch.optim.Adam(G.parameters(), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), fused=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    step = GANStep(acc, G, D, opt_g, opt_d, LossConfig(), nz=16, seed=0)
    out = step(images(0))
    # D ran under bf16 autocast (Accelerate hands its outputs back as fp32): the logits are bf16 values
    assert torch.equal(out.real_logits, out.real_logits.bfloat16().float())
    assert step.loss_scale() is None
    taken = step.stats.take()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in taken.values())
    assert float(taken["train/nonfinite_steps"]) == 0.0


def test_auto_precision_is_bf16_only_on_a_bf16_cuda_gpu(monkeypatch):
    import dcgan_dist.parallel
    from dcgan_dist.cpu import CpuBf16
    from dcgan_dist.parallel import resolve_precision

    # a CPU without native bf16 (tests/test_cpu_fastpath.py covers the CPU's own decision)
    monkeypatch.setattr(dcgan_dist.parallel, "probe_cpu_bf16", lambda: CpuBf16(False, "emulated"))
    assert resolve_precision("fp16") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_precision("auto") == "bf16"  # native bf16, not emulation, counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto") == "no"  # a pre-Ampere GPU only emulates bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert resolve_precision("auto") == "no"


def test_auto_precision_runs_in_fp32_on_cpu_and_the_log_says_so(monkeypatch):
    import dcgan_dist.parallel
    from dcgan_dist.cpu import CpuBf16

    monkeypatch.setattr(dcgan_dist.parallel, "probe_cpu_bf16", lambda: CpuBf16(False, "emulated"))
    cfg = load_config(None, [])
    assert cfg.precision == "auto"
    acc = build_accelerator(cfg)
    assert (cfg.precision, acc.mixed_precision) == ("no", "no")
