"""dcgan-train: the lab's DCGAN trained through Accelerate, one loop that reads top to bottom.

    dcgan-train --config configs/smoke.yaml train.batch_size=64
    accelerate launch -m dcgan_dist.train --config configs/celeba64.yaml

Data (shards or a folder) -> GANStep on the device -> reduced scalars to TensorBoard ->
checkpoints. Starting on an existing run.dir resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from dcgan_dist.checkpoint import (CHECKPOINT_DIR, TrainingState, latest_checkpoint, load_checkpoint,
                                   save_checkpoint)
from dcgan_dist.config import Config, ConfigError, config_to_yaml, load_config
from dcgan_dist.data import BatchSource, make_batch_source
from dcgan_dist.data.prepare import resolve_source
from dcgan_dist.diagnostics import Diagnostics
from dcgan_dist.fastpath import StepRunner, prepare_models
from dcgan_dist.metrics import TB_DIR, RunLogger, reduce_mean
from dcgan_dist.models import Discriminator, Generator, count_parameters, sample_with_batch_statistics
from dcgan_dist.parallel import build_accelerator, prepare_gan
from dcgan_dist.preemption import StopRequest
from dcgan_dist.step import HEALTH_TAGS, STAT_TAGS, GANStep

FIXED_NOISE_SAMPLES = 64
REAL_GRID_SAMPLES = 64


class NonFiniteError(RuntimeError):
    """`train.max_nonfinite` consecutive steps had a non-finite loss or gradient."""


def reduced_scalars(accelerator: Accelerator, step_fn: GANStep, max_nonfinite: int) -> tuple[dict[str, float], bool]:
    """The interval's step statistics and health counts averaged over ranks (one collective), and
    whether some rank reached `max_nonfinite` consecutive non-finite steps."""
    tags, parts = [*STAT_TAGS, *HEALTH_TAGS], [step_fn.take_means(), step_fn.take_health()]
    scale = step_fn.loss_scale()
    if scale is not None:
        tags.append("amp/scale")
        parts.append(scale.reshape(1).float())
    values = reduce_mean(accelerator, torch.cat([*parts, step_fn.nonfinite_flags(max_nonfinite)]))
    scalars = dict(zip(tags, values))
    if scale is None:  # without fp16 nothing is skipped for overflow
        del scalars["amp/skipped_steps"]
    return scalars, values[len(tags)] > 0


def prepare_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    run_dir = Path(cfg.run.dir)
    if accelerator.is_main_process:
        if cfg.run.fresh:
            shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
            shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(config_to_yaml(cfg))
        tmp.replace(run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def train(cfg: Config) -> dict[str, float]:
    """Run (or resume) training as configured; returns the last logged scalars.

    SIGUSR1 or SIGTERM (see preemption.py) ends the run early with a checkpoint; starting again resumes.
    """
    accelerator = build_accelerator(cfg)
    with StopRequest(accelerator, cfg.train.stop_check_every) as stop:  # before any loader worker forks
        return run_training(cfg, accelerator, stop)


def build_gan(cfg: Config, accelerator: Accelerator, lr_scale: float = 1) -> tuple:
    """G, D (the same initial weights on every rank), their fused Adam optimizers, prepared, and the step."""
    torch.manual_seed(cfg.run.seed)
    G = Generator(cfg.model.nz, cfg.model.ngf, cfg.model.channels)
    D = Discriminator(cfg.model.ndf, cfg.model.channels)
    prepare_models(cfg.perf, accelerator.device, G, D)
    fused = {"fused": True}
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr_g * lr_scale, betas=cfg.optim.betas_g, **fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d * lr_scale, betas=cfg.optim.betas_d, **fused)
    G, D, opt_g, opt_d = prepare_gan(accelerator, cfg.ddp.batchnorm, G, D, opt_g, opt_d)
    step_fn = GANStep(accelerator, G, D, opt_g, opt_d, cfg.loss, cfg.model.nz, cfg.run.seed)
    return G, D, opt_g, opt_d, step_fn


def run_training(cfg: Config, accelerator: Accelerator, stop: StopRequest) -> dict[str, float]:
    cfg.data.source = resolve_source(cfg.data, cfg.run.seed, accelerator)
    run_dir = prepare_run_dir(cfg, accelerator)
    world = accelerator.num_processes
    source: BatchSource = make_batch_source(cfg.data, batch_size=cfg.train.batch_size,
                                            rank=accelerator.process_index, world_size=world, seed=cfg.run.seed)

    lr_scale = world if cfg.optim.scale_lr else 1
    G, D, opt_g, opt_d, step_fn = build_gan(cfg, accelerator, lr_scale)

    fixed_noise = torch.randn(FIXED_NOISE_SAMPLES, cfg.model.nz, 1, 1,
                              generator=torch.Generator().manual_seed(cfg.run.seed)).to(accelerator.device)
    state = TrainingState(step=0, epoch=0, batch_in_epoch=0, fixed_noise=fixed_noise, world_size=world,
                          batch_size=cfg.train.batch_size)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt, G, D, opt_g, opt_d, step_fn.noise)
        if (state.world_size, state.batch_size) != (world, cfg.train.batch_size):
            seen = state.batch_in_epoch * state.world_size * state.batch_size
            state.batch_in_epoch = seen // (world * cfg.train.batch_size)
        state.world_size, state.batch_size = world, cfg.train.batch_size
        for opt, lr in ((opt_g, cfg.optim.lr_g), (opt_d, cfg.optim.lr_d)):  # the config and world size decide,
            for group in opt.param_groups:  # not the checkpoint (scale_lr after a requeue on another node count)
                group["lr"] = lr * lr_scale

    bpe = source.batches_per_epoch
    total = cfg.train.epochs * bpe
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    images_per_step = cfg.train.batch_size * world
    log = RunLogger(accelerator, run_dir, state.step, total)
    log.message(f"[dcgan-train] {source.describe()}")
    log.message(f"[dcgan-train] {world} process(es) on {accelerator.device}, precision {cfg.precision}, "
                f"batch {cfg.train.batch_size} per process = {images_per_step} global; "
                f"G {count_parameters(G):,} / D {count_parameters(D):,} parameters; steps {state.step} -> {total}")
    if ckpt is not None:
        log.message(f"[dcgan-train] resumed from {ckpt} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    else:
        log.text("config", 0, "```\n" + config_to_yaml(cfg) + "\n```")
        first = next(iter(source.batches(0)))
        log.grid("images/real", 0, first.images[:REAL_GRID_SAMPLES])
    run_step = StepRunner(step_fn, cfg.perf, log.message)  # after any checkpoint load: a CUDA graph fixes the state
    diagnostics = Diagnostics.for_run(cfg, accelerator, source, run_dir, state.step, log)

    def save() -> None:
        """Checkpoint unless the steps went non-finite: the last good checkpoint is never pruned for a bad one."""
        flags = reduce_mean(accelerator, step_fn.nonfinite_flags(cfg.train.max_nonfinite))
        limit_hit, last_bad = (v > 0 for v in flags)
        if limit_hit:
            stop_nonfinite()
        if last_bad:
            log.message(f"[dcgan-train] step {state.step}: not saving, the last step was not finite; "
                        f"latest good checkpoint: {latest_checkpoint(run_dir) or 'none'}")
            return
        save_checkpoint(accelerator, run_dir, state, G, D, opt_g, opt_d, step_fn.noise, config_to_yaml(cfg),
                        cfg.ckpt.keep, {"nz": cfg.model.nz, "ngf": cfg.model.ngf, "channels": cfg.model.channels})

    def stop_nonfinite() -> None:
        log.close()
        raise NonFiniteError(
            f"step {state.step}: {cfg.train.max_nonfinite} consecutive steps had a non-finite loss or gradient "
            f"(train.max_nonfinite) and were skipped; last good checkpoint: {latest_checkpoint(run_dir) or 'none'}; "
            "try lower optim.lr_g/lr_d or precision=bf16")

    def sample_grid() -> None:
        log.grid("images/fake_fixed_noise", state.step,
                 sample_with_batch_statistics(accelerator.unwrap_model(G), state.fixed_noise))

    last: dict[str, float] = {}
    started = time.perf_counter()
    start_step = state.step
    stopping = False
    while state.step < total and state.epoch < cfg.train.epochs and not stopping:
        for batch in source.batches(state.epoch, state.batch_in_epoch):
            diagnose = diagnostics is not None and diagnostics.due(state.step + 1)
            out = run_step(batch.images, collect_grad_norms=diagnose)
            state.step += 1
            if diagnose:
                diagnostics(state.step, out, accelerator.unwrap_model(G), log)
            state.batch_in_epoch += 1
            log.advance()
            if state.step % cfg.log.every == 0 or state.step == total:
                last, limit_hit = reduced_scalars(accelerator, step_fn, cfg.train.max_nonfinite)
                last["perf/img_per_s"] = log.rate(state.step, images_per_step)
                last["lr/G"], last["lr/D"] = opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]
                log.scalars(state.step, last)
                log.show({"img/s": last["perf/img_per_s"], "loss/D": last["loss/D"], "loss/G": last["loss/G"]})
                if limit_hit:
                    stop_nonfinite()
            if state.step % cfg.log.images_every == 0:
                sample_grid()
            if state.batch_in_epoch == bpe:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if state.step % cfg.ckpt.every == 0 and state.step != total:
                save()
            stopping = stop.should_stop(state.step)
            if stopping or state.step >= total:
                break
    if state.step % cfg.log.images_every != 0:
        sample_grid()
    save()
    log.close()
    elapsed = time.perf_counter() - started
    steps_done = state.step - start_step
    if accelerator.is_main_process:
        rate = steps_done * images_per_step / max(elapsed, 1e-9)
        tail = "".join(f"{k} {last[k]:.3f}; " for k in ("loss/D", "loss/G", "D(x)", "D(G(z))/after_D_step")
                       if k in last)
        if stopping:
            print(f"[dcgan-train] stopped by {stop.reason()} at step {state.step}/{total}; start the same "
                  f"command again to resume from {latest_checkpoint(run_dir)}", flush=True)
        print(f"[dcgan-train] done: step {state.step}/{total}, {steps_done} steps in {elapsed:.1f}s "
              f"({rate:,.0f} img/s); {tail}run dir {run_dir}", flush=True)
    accelerator.end_training()
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcgan-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset, e.g. configs/celeba64.yaml (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=64")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except ConfigError as exc:
        print(f"dcgan-train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"dcgan-train: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
