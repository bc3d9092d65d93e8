"""dcgan-train: the lab's DCGAN trained through Accelerate, one loop that reads top to bottom.

    dcgan-train --config configs/smoke.yaml train.batch_size=64
    accelerate launch -m dcgan_dist.train --config configs/celeba64.yaml

Data (shards or a folder) -> GANStep on the device -> reduced scalars to TensorBoard ->
checkpoints. Starting on an existing run.dir resumes from its newest checkpoint that verifies
(docs/reliability.md); one trainer at a time per run.dir.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from dcgan_dist.config import Config, ConfigError, config_to_yaml, load_config
from dcgan_dist.errors import ExplainedError
from dcgan_dist.fileio import atomic_write
from dcgan_dist.runlock import RunLockedError

if TYPE_CHECKING:  # torch, accelerate and what needs them load in the functions that use them: --help is instant
    import torch
    from accelerate import Accelerator

    from dcgan_dist.checkpoint import TrainingState
    from dcgan_dist.data import BatchSource
    from dcgan_dist.metrics import RunLogger
    from dcgan_dist.preemption import StopRequest
    from dcgan_dist.quality.in_training import TrainingEvaluator
    from dcgan_dist.step import GANStep

FIXED_NOISE_SAMPLES = 64
REAL_GRID_SAMPLES = 64


class NonFiniteError(ExplainedError):
    """`train.max_nonfinite` consecutive steps had a non-finite loss or gradient."""




def prepare_run_dir(cfg: Config, accelerator: Accelerator, held: ExitStack) -> Path:
    """The run folder, locked by the main process for as long as `held` lasts (runlock.py), emptied first
    with `run.fresh`, holding the resolved config.yaml.

    A second trainer on the same folder is refused before it writes anything, and every rank learns the
    main process's outcome (parallel.on_main_process): a refusal ends them all, none waits in a barrier.
    """
    from dcgan_dist.checkpoint import CHECKPOINT_DIR
    from dcgan_dist.metrics import TB_DIR
    from dcgan_dist.parallel import on_main_process
    from dcgan_dist.quality.in_training import BEST_DIR, QUALITY_JSON
    from dcgan_dist.runlock import RunLock

    run_dir = Path(cfg.run.dir)

    def prepare() -> None:
        for folder in (run_dir, run_dir / CHECKPOINT_DIR, run_dir / TB_DIR):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"config key 'run.dir': {folder} is a file, expected a folder there (or nothing); "
                                  "move the file away or choose another run.dir")
        held.enter_context(RunLock(run_dir))  # before anything is written
        if cfg.run.fresh:
            shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
            shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)
            shutil.rmtree(run_dir / BEST_DIR, ignore_errors=True)
            (run_dir / QUALITY_JSON).unlink(missing_ok=True)
        atomic_write(run_dir / "config.yaml", config_to_yaml(cfg))

    on_main_process(accelerator, f"prepare the run folder {run_dir}", prepare)
    return run_dir


def train(cfg: Config) -> dict[str, float]:
    """Run (or resume) training as configured; returns the last logged scalars.

    SIGUSR1 or SIGTERM (see preemption.py) ends the run early with a checkpoint; starting again resumes.
    """
    from dcgan_dist.parallel import build_accelerator
    from dcgan_dist.preemption import StopRequest

    accelerator = build_accelerator(cfg)
    # the stop handlers go in before any loader worker forks; `held` keeps the run folder's lock until the end
    with StopRequest(accelerator, cfg.train.stop_check_every) as stop, ExitStack() as held:
        return run_training(cfg, accelerator, stop, held)


def build_gan(cfg: Config, accelerator: Accelerator, lr_scale: float = 1) -> GANStep:
    """The training step over G and D (the same initial weights on every rank) and their fused Adam
    optimizers, all prepared by the accelerator."""
    import torch

    from dcgan_dist.fastpath import prepare_models
    from dcgan_dist.models import Discriminator, Generator
    from dcgan_dist.parallel import prepare_gan
    from dcgan_dist.step import GANStep

    torch.manual_seed(cfg.run.seed)
    G = Generator(cfg.model.nz, cfg.model.ngf, cfg.model.channels)
    D = Discriminator(cfg.model.ndf, cfg.model.channels)
    prepare_models(cfg.perf, accelerator.device, G, D)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr_g * lr_scale, betas=cfg.optim.betas_g, fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d * lr_scale, betas=cfg.optim.betas_d, fused=True)
    G, D, opt_g, opt_d = prepare_gan(accelerator, cfg.ddp.batchnorm, G, D, opt_g, opt_d)
    return GANStep(accelerator, G, D, opt_g, opt_d, cfg.loss, cfg.model.nz, cfg.run.seed,
                   ema_decay=cfg.model.ema_decay, ema_rampup=cfg.model.ema_rampup, g_steps=cfg.train.g_steps)


def fixed_noise(cfg: Config, accelerator: Accelerator) -> torch.Tensor:
    """The z of the sample grids: the same in every run with this seed, on every rank."""
    import torch

    generator = torch.Generator().manual_seed(cfg.run.seed)
    return torch.randn(FIXED_NOISE_SAMPLES, cfg.model.nz, 1, 1, generator=generator).to(accelerator.device)


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    """`train.max_steps` when set (the budget, however many epochs it takes), else `train.epochs` epochs."""
    return cfg.train.max_steps or cfg.train.epochs * batches_per_epoch


def run_training(cfg: Config, accelerator: Accelerator, stop: StopRequest, held: ExitStack) -> dict[str, float]:
    """The training loop, section by section; returns the last logged scalars.

    `gan_step` is the step (it owns G, D, their optimizers, the noise and the statistics); `runner`
    runs it, eagerly or as a CUDA graph; `state.step` counts the steps done. `held` keeps the run
    folder's lock.
    """
    from dcgan_dist.checkpoint import checkpoint_dirs, resume_or_start
    from dcgan_dist.cpu import apply_cpu_plan
    from dcgan_dist.data import make_batch_source
    from dcgan_dist.data.prepare import resolve_source
    from dcgan_dist.diagnostics import Diagnostics
    from dcgan_dist.fastpath import StepRunner
    from dcgan_dist.metrics import RunLogger
    from dcgan_dist.quality.in_training import TrainingEvaluator, check_eval_config

    # --- this process's CPU threads and loader workers, data, then the run folder: a data.source (or, for a
    # run with no checkpoint of its own, a run.init_from) that is not there fails before anything is written
    cpu_plan = apply_cpu_plan(cfg, accelerator.num_processes)
    if accelerator.is_main_process:
        print(cpu_plan.line(), flush=True)
    cfg.data.source = resolve_source(cfg.data, cfg.run.seed, accelerator)
    if cfg.run.init_from and not Path(cfg.run.init_from).exists() and not checkpoint_dirs(Path(cfg.run.dir)):
        raise ConfigError(f"config key 'run.init_from': {cfg.run.init_from} does not exist; expected a run folder "
                          "or one of its checkpoints/step-NNNNNNNN folders")
    if cfg.eval.every:
        check_eval_config(cfg)  # shards and the FID network there, before any work
    world = accelerator.num_processes
    source = make_batch_source(cfg.data, batch_size=cfg.train.batch_size, rank=accelerator.process_index,
                               world_size=world, seed=cfg.run.seed)
    run_dir = prepare_run_dir(cfg, accelerator, held)

    # --- the step, and the state to start from: the newest checkpoint that verifies, else run.init_from's, else step 0
    lr_scale = world if cfg.optim.scale_lr else 1
    gan_step = build_gan(cfg, accelerator, lr_scale)
    state, resumed_from, initialised_from = resume_or_start(
        accelerator, run_dir, gan_step, fixed_noise(cfg, accelerator), cfg.train.batch_size,
        (cfg.optim.lr_g * lr_scale, cfg.optim.lr_d * lr_scale), cfg.run.init_from)
    total = total_steps(cfg, source.batches_per_epoch)

    # --- what the user sees, and how the step runs
    log = RunLogger(accelerator, run_dir, state.step, total)
    announce_run(cfg, accelerator, log, source, gan_step, state, total, resumed_from, initialised_from)
    runner = StepRunner(gan_step, cfg.perf, log.message)  # after the resume: a CUDA graph fixes the state it captures
    diagnostics = Diagnostics.for_run(cfg, accelerator, source, run_dir, state.step, log)
    evaluator = TrainingEvaluator.for_run(cfg, accelerator, run_dir, state.step, gan_step.ema is not None, log)

    # --- the loop
    images_per_step = cfg.train.batch_size * world
    last: dict[str, float] = {}
    started, start_step, stopping = time.perf_counter(), state.step, False
    with log:  # closed on every way out, a NonFiniteError included
        while state.step < total and not stopping:
            for batch in source.batches(state.epoch, state.batch_in_epoch):
                diagnose = diagnostics is not None and diagnostics.due(state.step + 1)
                out = runner(batch.images, collect_grad_norms=diagnose)
                state.count_step(source.batches_per_epoch)
                if diagnose:
                    diagnostics(state.step, out, accelerator.unwrap_model(gan_step.G), log)
                log.advance()
                if state.step % cfg.log.every == 0 or state.step == total:
                    last, limit_reached = log_interval(accelerator, gan_step, log, state.step, images_per_step,
                                                       cfg.train.max_nonfinite)  # a collective
                    if limit_reached:
                        raise nonfinite_error(cfg, state, run_dir)
                if state.step % cfg.log.images_every == 0:
                    log_samples(accelerator, log, gan_step, state)
                if evaluator is not None and evaluator.due(state.step):
                    evaluate(cfg, accelerator, run_dir, state, gan_step, evaluator)  # collectives
                if state.step % cfg.ckpt.every == 0 and state.step != total:
                    save_unless_nonfinite(cfg, accelerator, run_dir, state, gan_step, log)  # a collective; may raise
                stopping = stop.should_stop(state.step)  # a collective on check steps
                if stopping or state.step >= total:
                    break

        # --- the end: last samples and checkpoint, a summary
        if state.step % cfg.log.images_every != 0:
            log_samples(accelerator, log, gan_step, state)
        if evaluator is not None and state.step >= total and not evaluator.due(state.step):
            evaluate(cfg, accelerator, run_dir, state, gan_step, evaluator)  # the finished run's quality
        save_unless_nonfinite(cfg, accelerator, run_dir, state, gan_step, log)
    if accelerator.is_main_process:
        print_summary(state.step, total, state.step - start_step, time.perf_counter() - started, images_per_step,
                      last, run_dir, stop.reason() if stopping else None)
    accelerator.end_training()
    return last


def announce_run(cfg: Config, accelerator: Accelerator, log: RunLogger, source: BatchSource, gan_step: GANStep,
                 state: TrainingState, total: int, resumed_from: Path | None, initialised_from: Path | None) -> None:
    """The run's first console lines; on a new run (not a resume) also the config and real images in TensorBoard."""
    from dcgan_dist.checkpoint import EMA_FILE, GENERATOR_EXPORT, RAW_GENERATOR_EXPORT
    from dcgan_dist.models import count_parameters

    world = accelerator.num_processes
    log.message(f"[dcgan-train] {source.describe()}")
    log.message(f"[dcgan-train] {world} process(es) on {accelerator.device}, precision {cfg.precision}, "
                f"batch {cfg.train.batch_size} per process = {cfg.train.batch_size * world} global; "
                f"G {count_parameters(gan_step.G):,} / D {count_parameters(gan_step.D):,} parameters; "
                f"steps {state.step} -> {total}")
    if gan_step.ema is not None:
        log.message(f"[dcgan-train] G's moving average: decay {cfg.model.ema_decay} per step (half-life "
                    f"{gan_step.ema.half_life:.0f} steps), ramp-up {cfg.model.ema_rampup}; "
                    f"{GENERATOR_EXPORT} holds the average, {RAW_GENERATOR_EXPORT} G itself")
    if resumed_from is not None:
        log.message(f"[dcgan-train] resumed from {resumed_from} (epoch {state.epoch}, batch {state.batch_in_epoch})")
        if gan_step.ema is not None and not (resumed_from / EMA_FILE).is_file():
            log.message(f"[dcgan-train] {resumed_from} holds no moving average of G: it starts from the loaded G")
    else:
        if initialised_from is not None:
            log.message(f"[dcgan-train] run.init_from: starting from {initialised_from} (step {state.step}, "
                        f"epoch {state.epoch}, batch {state.batch_in_epoch}); this run's settings from here on")
        log.text("config", 0, "```\n" + config_to_yaml(cfg) + "\n```")
        first = next(iter(source.batches(0)))
        log.grid("images/real", 0, first.images[:REAL_GRID_SAMPLES])


def log_interval(accelerator: Accelerator, gan_step: GANStep, log: RunLogger, step: int, images_per_step: int,
                 max_nonfinite: int) -> tuple[dict[str, float], bool]:
    """Log the interval's scalars: the step statistics averaged over ranks by name (one collective, which
    also carries the non-finite flags), speed and learning rates. Returns them, and whether some rank
    reached `max_nonfinite` consecutive non-finite steps."""
    from dcgan_dist.stats import reduce_by_name
    from dcgan_dist.step import NONFINITE_LIMIT_REACHED

    flags = gan_step.nonfinite_flags(max_nonfinite)
    scalars = reduce_by_name(accelerator, {**gan_step.stats.take(), **flags})
    limit_reached = scalars[NONFINITE_LIMIT_REACHED] > 0
    for name in flags:
        del scalars[name]
    scale = gan_step.loss_scale()
    if scale is not None:
        scalars["amp/scale"] = scale
    scalars["perf/img_per_s"] = log.rate(step, images_per_step)
    scalars["lr/G"], scalars["lr/D"] = gan_step.opt_g.param_groups[0]["lr"], gan_step.opt_d.param_groups[0]["lr"]
    log.scalars(step, scalars)
    log.show({"img/s": scalars["perf/img_per_s"], "loss/D": scalars["loss/D"], "loss/G": scalars["loss/G"]})
    return scalars, limit_reached


def nonfinite_error(cfg: Config, state: TrainingState, run_dir: Path) -> NonFiniteError:
    from dcgan_dist.checkpoint import latest_checkpoint

    return NonFiniteError(
        f"step {state.step}: {cfg.train.max_nonfinite} consecutive steps had a non-finite loss or gradient "
        f"(train.max_nonfinite) and were skipped; last good checkpoint: {latest_checkpoint(run_dir) or 'none'}; "
        "try lower optim.lr_g/lr_d or precision=bf16")


def save_unless_nonfinite(cfg: Config, accelerator: Accelerator, run_dir: Path, state: TrainingState,
                          gan_step: GANStep, log: RunLogger) -> None:
    """Checkpoint (every rank takes part) unless the steps went non-finite: the last good checkpoint is
    never pruned for a bad one. Raises NonFiniteError when some rank reached `train.max_nonfinite`."""
    from dcgan_dist.checkpoint import latest_checkpoint, save_checkpoint
    from dcgan_dist.stats import reduce_by_name
    from dcgan_dist.step import LAST_STEP_NONFINITE, NONFINITE_LIMIT_REACHED

    flags = reduce_by_name(accelerator, gan_step.nonfinite_flags(cfg.train.max_nonfinite))  # over all ranks
    if flags[NONFINITE_LIMIT_REACHED] > 0:
        raise nonfinite_error(cfg, state, run_dir)
    if flags[LAST_STEP_NONFINITE] > 0:
        log.message(f"[dcgan-train] step {state.step}: not saving, the last step was not finite; "
                    f"latest good checkpoint: {latest_checkpoint(run_dir) or 'none'}")
        return
    save_checkpoint(accelerator, run_dir, state, gan_step, config_to_yaml(cfg), cfg.ckpt.keep, generator_config(cfg))


def generator_config(cfg: Config) -> dict:
    """The generator's constructor arguments, stored in its exports."""
    return {"nz": cfg.model.nz, "ngf": cfg.model.ngf, "channels": cfg.model.channels}


def evaluate(cfg: Config, accelerator: Accelerator, run_dir: Path, state: TrainingState, gan_step: GANStep,
             evaluator: TrainingEvaluator) -> None:
    """FID/KID now (every rank takes part); a new best FID is saved as RUN/best/, apart from the rolling
    checkpoints (a run folder of its own, one checkpoint kept)."""
    from dcgan_dist.checkpoint import save_checkpoint
    from dcgan_dist.quality.in_training import BEST_DIR

    def save_best() -> Path:
        return save_checkpoint(accelerator, run_dir / BEST_DIR, state, gan_step, config_to_yaml(cfg), 1,
                               generator_config(cfg))

    evaluator(state.step, gan_step, save_best)


def log_samples(accelerator: Accelerator, log: RunLogger, gan_step: GANStep, state: TrainingState) -> None:
    """G(fixed noise) as an image grid in TensorBoard, and its moving average's beside it."""
    from dcgan_dist.models import sample_with_batch_statistics

    G = accelerator.unwrap_model(gan_step.G)
    log.grid("images/fake_fixed_noise", state.step, sample_with_batch_statistics(G, state.fixed_noise))
    if gan_step.ema is not None:
        log.grid("images/fake_fixed_noise_ema", state.step, sample_with_batch_statistics(gan_step.ema.model,
                                                                                         state.fixed_noise))


def print_summary(step: int, total: int, steps_done: int, elapsed: float, images_per_step: int,
                  last: dict[str, float], run_dir: Path, stopped_by: str | None) -> None:
    """The run's last console lines: why it stopped early if it did; steps, speed, the last losses, the run dir."""
    from dcgan_dist.checkpoint import latest_checkpoint

    if stopped_by is not None:
        print(f"[dcgan-train] stopped by {stopped_by} at step {step}/{total}; start the same "
              f"command again to resume from {latest_checkpoint(run_dir)}", flush=True)
    rate = steps_done * images_per_step / max(elapsed, 1e-9)
    tail = "".join(f"{k} {last[k]:.3f}; " for k in ("loss/D", "loss/G", "D(x)", "D(G(z))/after_D_step") if k in last)
    print(f"[dcgan-train] done: step {step}/{total}, {steps_done} steps in {elapsed:.1f}s "
          f"({rate:,.0f} img/s); {tail}run dir {run_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcgan-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset, e.g. configs/celeba64.yaml (default: built-in defaults)")
    parser.add_argument("--verify-checkpoints", metavar="RUN_DIR",
                        help="check every checkpoint of RUN_DIR against its checksums, one line each, and exit "
                             "(status 1 if any is damaged); trains nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=64")
    args = parser.parse_args(argv)
    if args.verify_checkpoints is not None:
        if args.config or args.overrides:
            parser.error("--verify-checkpoints takes a run folder and nothing else")
        return verify_checkpoints(Path(args.verify_checkpoints))
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, RunLockedError) as exc:
        print(f"dcgan-train: error: {exc}", file=sys.stderr)
        return 2
    except ExplainedError as exc:
        print(f"dcgan-train: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a folder that cannot be written: the file and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dcgan-train: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dcgan-train: interrupted; start the same command again to resume from the latest checkpoint",
              file=sys.stderr)
        return 130
    return 0


def verify_checkpoints(run_dir: Path) -> int:
    """`--verify-checkpoints`: one line per checkpoint (and per interrupted write); 1 if any is damaged or
    there is none, 2 if the folder is not there."""
    from dcgan_dist.checkpoint import CHECKPOINT_DIR, interrupted_writes, verify_run

    if not run_dir.is_dir():
        print(f"dcgan-train: error: {run_dir}: not a folder, expected a run folder (run.dir)", file=sys.stderr)
        return 2
    found = verify_run(run_dir)
    for path, verdict in found:
        print(f"{verdict.status:<10} {path}: {verdict.detail}")
    for path in interrupted_writes(run_dir):
        print(f"{'partial':<10} {path}: an interrupted write, never loaded; the next save removes it")
    if not found:
        print(f"no checkpoints in {run_dir / CHECKPOINT_DIR}")
    return 0 if found and all(verdict.usable for _, verdict in found) else 1


if __name__ == "__main__":
    sys.exit(main())
