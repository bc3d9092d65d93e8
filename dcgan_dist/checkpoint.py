"""Atomic, unpickle-free checkpoints under RUN/checkpoints/, and the inference export.

A checkpoint is a folder `step-NNNNNNNN/` holding `G.safetensors`, `D.safetensors`, with
`model.ema_decay` > 0 also `G_ema.safetensors` (G's moving average), and `state.pt` (optimizers,
grad scaler, step, data position, every rank's noise RNG state, the fixed noise, the EMA's update
count, the config), loaded with `torch.load(weights_only=True)`. It is written as
`.tmp-step-NNNNNNNN/` and renamed when complete, so a crash mid-write never leaves a folder
that looks like a checkpoint. Every rank calls `save_checkpoint` (RNG states are gathered);
only the main process writes. `resume_or_start` is how a run begins: from the latest checkpoint
if there is one, with the rules that let it continue on another number of processes.

The inference export beside the checkpoints is RUN/generator.safetensors: G's moving average when
the run keeps one, else G itself; the raw G of an EMA run is RUN/generator_raw.safetensors. The
export's metadata says which (`weights`: "ema" or "raw").
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from dcgan_dist.errors import first_line, summary
from dcgan_dist.fileio import atomic_path, fsync_dir
from dcgan_dist.seeds import reseeded_noise_seed
from dcgan_dist.step import GANStep

CHECKPOINT_DIR = "checkpoints"
GENERATOR_EXPORT = "generator.safetensors"
RAW_GENERATOR_EXPORT = "generator_raw.safetensors"  # written beside GENERATOR_EXPORT when it holds the EMA
EMA_FILE = "G_ema.safetensors"  # in a checkpoint folder, with model.ema_decay > 0
_NAME = re.compile(r"^step-(\d{8})$")
_FILES = ("G.safetensors", "D.safetensors", "state.pt")


@dataclass
class TrainingState:
    """Everything besides weights and optimizers that a resumed run needs."""

    step: int
    epoch: int
    batch_in_epoch: int  # index of the next batch to read in `epoch`
    fixed_noise: torch.Tensor
    world_size: int
    batch_size: int

    def count_step(self, batches_per_epoch: int) -> None:
        """One more step done: the next batch, and the next epoch after its last batch."""
        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and all((p / f).is_file() for f in _FILES)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _state_dict_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def export_generator(G: nn.Module, path: Path, model_config: dict, weights: str = "raw") -> None:
    """G's weights with its constructor arguments in the metadata, for `Generator(**config)`; `weights`
    ("raw" or "ema") says whether they are G's own or its moving average."""
    meta = {"model_config": json.dumps(model_config), "format": "dcgan_dist.Generator", "weights": weights}
    with atomic_path(path) as tmp:
        save_file(_state_dict_for_safetensors(G), str(tmp), metadata=meta)


def export_generators(run_dir: Path, G: nn.Module, G_ema: nn.Module | None, model_config: dict) -> None:
    """RUN/generator.safetensors: the EMA when there is one (and the raw G as RUN/generator_raw.safetensors),
    else the raw G (and no stale generator_raw.safetensors from an earlier EMA run)."""
    run_dir = Path(run_dir)
    if G_ema is None:
        export_generator(G, run_dir / GENERATOR_EXPORT, model_config)
        (run_dir / RAW_GENERATOR_EXPORT).unlink(missing_ok=True)
        return
    export_generator(G, run_dir / RAW_GENERATOR_EXPORT, model_config)
    export_generator(G_ema, run_dir / GENERATOR_EXPORT, model_config, weights="ema")


def export_weights(path: Path) -> str:
    """Which weights an export holds: "ema" or "raw" (exports without the key predate the EMA: raw)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("weights", "raw")


def load_generator(path: Path) -> nn.Module:
    """Rebuild the generator from `export_generator`'s file (no pickle involved)."""
    from safetensors import safe_open

    from dcgan_dist.models import Generator

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "dcgan_dist.Generator":
        raise ValueError(f"{path}: not a dcgan_dist generator export (metadata format={meta.get('format')!r})")
    G = Generator(**json.loads(meta["model_config"]))
    G.load_state_dict(load_file(str(path)))
    return G.eval()


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainingState, gan_step: GANStep,
                    config_yaml: str, keep: int, model_config: dict) -> Path:
    """Write checkpoint `step-<state.step>` atomically; prune to the newest `keep`. Call on every rank.

    Every rank's state of the generator that draws z (`gan_step.noise`) is gathered and saved.
    """
    rng = accelerator.gather(gan_step.noise.get_state().to(accelerator.device).unsqueeze(0)).cpu()
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step-{state.step:08d}"
    if accelerator.is_main_process:
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        G, D = accelerator.unwrap_model(gan_step.G), accelerator.unwrap_model(gan_step.D)
        save_file(_state_dict_for_safetensors(G), str(tmp / "G.safetensors"))
        save_file(_state_dict_for_safetensors(D), str(tmp / "D.safetensors"))
        ema = gan_step.ema
        if ema is not None:
            save_file(_state_dict_for_safetensors(ema.model), str(tmp / EMA_FILE))
        scaler = accelerator.scaler
        torch.save({
            "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
            "world_size": state.world_size, "batch_size": state.batch_size,
            "fixed_noise": state.fixed_noise.cpu(), "rng": rng,
            "opt_g": gan_step.opt_g.state_dict(), "opt_d": gan_step.opt_d.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "config": config_yaml,
            "ema_updates": ema.updates.cpu() if ema is not None else None,
        }, tmp / "state.pt")
        for f in _FILES + ((EMA_FILE,) if ema is not None else ()):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. end of run right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)
        export_generators(Path(run_dir), G, ema.model if ema is not None else None, model_config)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, gan_step: GANStep) -> TrainingState:
    """Restore weights, optimizers, scaler and this rank's noise RNG from `path` into the step; return the
    training state as saved."""
    try:
        blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        g_sd, d_sd = load_file(str(path / "G.safetensors")), load_file(str(path / "D.safetensors"))
    except Exception as exc:  # a damaged file must name itself, not raise from deep inside torch
        raise RuntimeError(f"checkpoint {path}: cannot be read ({summary(exc)})") from None
    try:
        accelerator.unwrap_model(gan_step.G).load_state_dict(g_sd)
        accelerator.unwrap_model(gan_step.D).load_state_dict(d_sd)
    except RuntimeError as exc:
        raise RuntimeError(f"checkpoint {path}: weights do not fit this config's model ({first_line(exc)}); "
                           "use the run's model.* settings or a new run.dir") from None
    load_ema(path, blob, gan_step)
    gan_step.opt_g.load_state_dict(blob["opt_g"])
    gan_step.opt_d.load_state_dict(blob["opt_d"])
    if accelerator.scaler is not None and blob["scaler"] is not None:
        accelerator.scaler.load_state_dict(blob["scaler"])
    rng, rank = blob["rng"], accelerator.process_index
    if rng.shape[0] == accelerator.num_processes:
        gan_step.noise.set_state(rng[rank].clone())  # a row view at an offset crashes set_state
    else:  # another world size: a fresh, still deterministic stream per rank
        gan_step.noise.manual_seed(reseeded_noise_seed(blob["step"], rank))
    return TrainingState(step=blob["step"], epoch=blob["epoch"], batch_in_epoch=blob["batch_in_epoch"],
                         fixed_noise=blob["fixed_noise"].to(accelerator.device), world_size=blob["world_size"],
                         batch_size=blob["batch_size"])


def load_ema(path: Path, blob: dict, gan_step: GANStep) -> None:
    """The moving average and its update count from checkpoint `path` (`blob`: its state.pt); a
    checkpoint without one (EMA turned on at this resume) starts the average from the loaded G."""
    ema = gan_step.ema
    if ema is None:
        return
    if not (path / EMA_FILE).is_file() or blob.get("ema_updates") is None:
        ema.reset()
        return
    try:
        ema.model.load_state_dict(load_file(str(path / EMA_FILE)))
    except Exception as exc:  # damaged, or another model size: name the file, as for G and D
        raise RuntimeError(f"checkpoint {path}: {EMA_FILE} cannot be loaded ({summary(exc)})") from None
    ema.updates.copy_(blob["ema_updates"])


def resume_or_start(accelerator: Accelerator, run_dir: Path, gan_step: GANStep, fixed_noise: torch.Tensor,
                    batch_size: int, learning_rates: tuple[float, float]) -> tuple[TrainingState, Path | None]:
    """The run's training state and the checkpoint it resumed from: the latest one in `run_dir`, loaded
    into `gan_step`, or none and a fresh state at step 0 (with `fixed_noise` for the sample grids).

    A resume may run on another number of processes or another per-process `batch_size` (a requeue on
    other nodes). Two rules keep it right:
    * the data position is counted in samples: the epoch goes on after as many samples as were seen,
      in whole batches of the new global size;
    * the learning rates are `learning_rates` (G, D) as the config and the world size give them now
      (optim.scale_lr), not the ones saved in the optimizers' state.
    """
    world = accelerator.num_processes
    path = latest_checkpoint(run_dir)
    if path is None:
        return TrainingState(step=0, epoch=0, batch_in_epoch=0, fixed_noise=fixed_noise, world_size=world,
                             batch_size=batch_size), None
    state = load_checkpoint(accelerator, path, gan_step)
    if (state.world_size, state.batch_size) != (world, batch_size):
        seen = state.batch_in_epoch * state.world_size * state.batch_size
        state.batch_in_epoch = seen // (world * batch_size)
    state.world_size, state.batch_size = world, batch_size
    for opt, lr in zip((gan_step.opt_g, gan_step.opt_d), learning_rates):
        for group in opt.param_groups:
            group["lr"] = lr
    return state, path
