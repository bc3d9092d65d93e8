"""Atomic, unpickle-free checkpoints that prove themselves, under RUN/checkpoints/, and the inference export.

A checkpoint is a folder `step-NNNNNNNN/` holding `G.safetensors`, `D.safetensors` and
`state.pt` (optimizers, grad scaler, step, data position, every rank's noise RNG state, the fixed
noise, the config), loaded with `torch.load(weights_only=True)`, and last `checksums.json`: the
size and sha256 of every other file in the folder, whatever its name. It is written as
`step-NNNNNNNN.tmp/` and renamed when complete, so a crash mid-write never leaves a folder that
looks like a checkpoint. Every rank calls `save_checkpoint` (RNG states are gathered); only the
main process writes.

`resume_or_start` is how a run begins: from the newest checkpoint that verifies against its
checksums (a damaged one is reported in one line and passed over), with the rules that let it
continue on another number of processes; a run with no checkpoint of its own may start from another
run's (`run.init_from`). Checkpoints written before checksums existed have no checksums.json: they
are loaded unverified, with a note.

With `model.ema_decay` > 0 a checkpoint also holds `G_ema.safetensors` (G's moving average), and
state.pt the EMA's update count. The inference export beside the checkpoints is
RUN/generator.safetensors: G's moving average when the run keeps one, else G itself; the raw G of an
EMA run is RUN/generator_raw.safetensors. The export's metadata says which (`weights`: "ema" or "raw").
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from dcgan_dist.config import ConfigError
from dcgan_dist.errors import ExplainedError, first_line, summary
from dcgan_dist.fileio import atomic_path, sha256_of
from dcgan_dist.parallel import on_main_process
from dcgan_dist.seeds import reseeded_noise_seed
from dcgan_dist.step import GANStep

CHECKPOINT_DIR = "checkpoints"
CHECKSUMS = "checksums.json"
GENERATOR_EXPORT = "generator.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")
_PARTIAL = re.compile(r"^(step-\d{8}\.tmp|\.tmp-step-\d{8})$")  # an interrupted write (this version's, an older one's)
_FILES = ("G.safetensors", "D.safetensors", "state.pt")
RAW_GENERATOR_EXPORT = "generator_raw.safetensors"  # written beside GENERATOR_EXPORT when it holds the EMA
EMA_FILE = "G_ema.safetensors"  # in a checkpoint folder, with model.ema_decay > 0


class CheckpointError(ExplainedError):
    """A checkpoint that cannot be used: damaged, unreadable, or made for another model."""


class Verdict(NamedTuple):
    """What `verify_checkpoint` found: `ok` (every file matches checksums.json), `unverified` (no
    checksums.json: written by an earlier version) or `damaged`; `detail` says what, in a phrase."""

    status: Literal["ok", "unverified", "damaged"]
    detail: str

    @property
    def usable(self) -> bool:
        return self.status != "damaged"


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


def step_folders(run_dir: Path) -> list[Path]:
    """Every `step-NNNNNNNN` folder, complete or not, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=_step)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (every file a checkpoint needs is there; contents not checked), oldest first."""
    return [p for p in step_folders(run_dir) if all((p / f).is_file() for f in _FILES)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _files_of(folder: Path) -> list[str]:
    """Every file in `folder` and below (checksums.json aside), as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != CHECKSUMS)


def write_checksums(folder: Path) -> None:
    """`folder/checksums.json`: the size and sha256 of every file the folder holds, whatever its name."""
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
             for name in _files_of(folder)}
    (folder / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1) + "\n")


def verify_checkpoint(folder: Path) -> Verdict:
    """Check every file of a checkpoint folder against its checksums.json (reads and hashes them all)."""
    folder = Path(folder)
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if not (folder / CHECKSUMS).is_file():
        if missing:
            return Verdict("damaged", f"incomplete: no {', '.join(missing)} and no {CHECKSUMS}")
        return Verdict("unverified", f"no {CHECKSUMS} (written by an earlier version), loaded without a check")
    try:
        listed = json.loads((folder / CHECKSUMS).read_text())["files"]
        expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in listed.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Verdict("damaged", f"{CHECKSUMS} is unreadable ({summary(exc)})")
    unlisted = [f for f in _FILES if f not in expected] + [f for f in _files_of(folder) if f not in expected
                                                            and f not in _FILES]
    if unlisted:
        return Verdict("damaged", f"{unlisted[0]} is not listed in {CHECKSUMS}")
    for name, (size, digest) in expected.items():
        path = folder / name
        if not path.is_file():
            return Verdict("damaged", f"{name} is missing")
        if path.stat().st_size != size:
            return Verdict("damaged", f"{name} has {path.stat().st_size} bytes, {CHECKSUMS} says {size} "
                                      "(truncated or replaced)")
        if sha256_of(path) != digest:
            return Verdict("damaged", f"{name}: sha256 differs from {CHECKSUMS} (its bytes changed)")
    return Verdict("ok", f"{len(expected)} files match {CHECKSUMS}")


def verify_run(run_dir: Path) -> list[tuple[Path, Verdict]]:
    """Every checkpoint of the run (step folders, and any other folder holding a checksums.json, such as a
    kept best one) with its verdict, oldest step first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    steps = step_folders(run_dir)
    others = sorted(p for p in root.iterdir() if p.is_dir() and p not in steps and not _PARTIAL.match(p.name)
                    and (p / CHECKSUMS).is_file()) if root.is_dir() else []
    return [(p, verify_checkpoint(p)) for p in steps + others]


def interrupted_writes(run_dir: Path) -> list[Path]:
    """Folders a checkpoint write left when it was killed mid-way; the next save removes them."""
    root = Path(run_dir) / CHECKPOINT_DIR
    return sorted(p for p in root.iterdir() if _PARTIAL.match(p.name)) if root.is_dir() else []


def choose_checkpoint(run_dir: Path) -> int | None:
    """The step of the newest checkpoint that verifies, None when the run has none; one line per damaged
    checkpoint passed over (main process). Raises CheckpointError when there are some and none verifies."""
    folders = step_folders(run_dir)
    for path in reversed(folders):
        verdict = verify_checkpoint(path)
        if verdict.usable:
            if verdict.status == "unverified":
                print(f"[dcgan-train] note: checkpoint {path}: {verdict.detail}", flush=True)
            return _step(path)
        print(f"[dcgan-train] checkpoint {path} is damaged, passed over: {verdict.detail}", flush=True)
    if folders:
        raise CheckpointError(
            f"{Path(run_dir) / CHECKPOINT_DIR}: none of its {len(folders)} checkpoint(s) verifies (newest: "
            f"{folders[-1].name}); see `dcgan-train --verify-checkpoints {run_dir}`, or start over with run.fresh=true")
    return None


def _prune(run_dir: Path, saved: Path, keep: int) -> None:
    """After `saved` is written: remove interrupted writes, incomplete folders, checkpoints newer than `saved`
    (a resume passed over them as damaged) and all but the newest `keep` complete ones up to `saved`.
    Folders with other names are left alone."""
    complete = [p for p in checkpoint_dirs(run_dir) if _step(p) <= _step(saved)]
    doomed = interrupted_writes(run_dir) + [p for p in step_folders(run_dir) if p not in complete] + complete[:-keep]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def _step(folder: Path) -> int:
    return int(_NAME.match(folder.name).group(1))


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
    """Write checkpoint `step-<state.step>` atomically with its checksums, prune (see `_prune`) and update
    the generator export. Call on every rank: every rank's state of the generator that draws z
    (`gan_step.noise`) is gathered and saved, and when the main process cannot write, every rank raises
    (parallel.on_main_process)."""
    rng = accelerator.gather(gan_step.noise.get_state().to(accelerator.device).unsqueeze(0)).cpu()
    final = Path(run_dir) / CHECKPOINT_DIR / f"step-{state.step:08d}"

    def write() -> None:
        G, D = accelerator.unwrap_model(gan_step.G), accelerator.unwrap_model(gan_step.D)
        ema = gan_step.ema
        models = {"G.safetensors": G, "D.safetensors": D, **({EMA_FILE: ema.model} if ema is not None else {})}
        scaler = accelerator.scaler
        blob = {
            "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
            "world_size": state.world_size, "batch_size": state.batch_size,
            "fixed_noise": state.fixed_noise.cpu(), "rng": rng,
            "opt_g": gan_step.opt_g.state_dict(), "opt_d": gan_step.opt_d.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "config": config_yaml,
            "ema_updates": ema.updates.cpu() if ema is not None else None,
        }
        try:
            _write_folder(final, models, blob)
            _prune(run_dir, final, keep)
            export_generators(Path(run_dir), G, ema.model if ema is not None else None, model_config)
        except Exception as exc:  # a full disk surfaces from safetensors or torch.save as their own errors
            raise CheckpointError(f"checkpoint {final}: could not be written ({summary(exc)}); the checkpoints "
                                  "before it are intact") from exc

    on_main_process(accelerator, f"write checkpoint {final}", write)
    return final


def _write_folder(final: Path, models: dict[str, nn.Module], blob: dict) -> None:
    """The checkpoint folder `final`: each model's weights, `state.pt`, then checksums.json; durable, and
    under its own name only once complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final, durable=True) as tmp:
        tmp.mkdir()
        for name, model in models.items():
            save_file(_state_dict_for_safetensors(model), str(tmp / name))
        torch.save(blob, tmp / "state.pt")
        write_checksums(tmp)  # last: a folder without it, or with files it does not list, never verifies
        for name in [*_files_of(tmp), CHECKSUMS]:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. end of run right after a periodic save)
            shutil.rmtree(final)


def load_checkpoint(accelerator: Accelerator, path: Path, gan_step: GANStep) -> TrainingState:
    """Restore weights, optimizers, scaler and this rank's noise RNG from `path` into the step; return the
    training state as saved."""
    try:
        blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        g_sd, d_sd = load_file(str(path / "G.safetensors")), load_file(str(path / "D.safetensors"))
    except Exception as exc:  # a damaged file must name itself, not raise from deep inside torch
        raise CheckpointError(f"checkpoint {path}: cannot be read ({summary(exc)})") from None
    try:
        accelerator.unwrap_model(gan_step.G).load_state_dict(g_sd)
        accelerator.unwrap_model(gan_step.D).load_state_dict(d_sd)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit this config's model ({first_line(exc)}); "
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
        raise CheckpointError(f"checkpoint {path}: {EMA_FILE} cannot be loaded ({summary(exc)})") from None
    ema.updates.copy_(blob["ema_updates"])


def initial_checkpoint(init_from: str | Path, step: int | None = None) -> Path:
    """The checkpoint `run.init_from` names: a checkpoint folder itself, or a run folder's newest checkpoint
    that verifies (`step`, when already chosen). Raises ConfigError when there is none, CheckpointError when
    the checkpoint is damaged; both name the key."""
    source = Path(init_from)
    if (source / "state.pt").is_file():
        if step is None and not (verdict := verify_checkpoint(source)).usable:
            raise CheckpointError(f"config key 'run.init_from': checkpoint {source} is damaged ({verdict.detail})")
        return source
    if step is None:
        step = choose_checkpoint(source)
        if step is None:
            raise ConfigError(f"config key 'run.init_from': {source} holds no checkpoint; expected a run folder "
                              "with checkpoints/step-NNNNNNNN or one such folder")
    return source / CHECKPOINT_DIR / f"step-{step:08d}"


def resume_or_start(accelerator: Accelerator, run_dir: Path, gan_step: GANStep, fixed_noise: torch.Tensor,
                    batch_size: int, learning_rates: tuple[float, float],
                    init_from: str = "") -> tuple[TrainingState, Path | None, Path | None]:
    """The run's training state, the checkpoint it resumed from and the one it was initialised from: the
    newest one in `run_dir` that verifies (`choose_checkpoint`, on the main process; every rank loads the one
    it chose), else the checkpoint `init_from` names (`run.init_from`), loaded into `gan_step`; else a fresh
    state at step 0 (with `fixed_noise` for the sample grids).

    A start from a checkpoint may run on another number of processes or another per-process `batch_size` (a
    requeue on other nodes). Two rules keep it right:
    * the data position is counted in samples: the epoch goes on after as many samples as were seen,
      in whole batches of the new global size;
    * the learning rates are `learning_rates` (G, D) as the config and the world size give them now
      (optim.scale_lr), not the ones saved in the optimizers' state.
    """
    world = accelerator.num_processes
    step = on_main_process(accelerator, "choose a checkpoint to resume from", lambda: choose_checkpoint(run_dir))
    resumed_from = initialised_from = None
    if step is not None:
        path = resumed_from = Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}"
    elif init_from:
        def check() -> int:  # on the main process: the chosen checkpoint's step (-1: a folder named otherwise)
            chosen = initial_checkpoint(init_from)
            return _step(chosen) if _NAME.match(chosen.name) else -1

        path = initialised_from = initial_checkpoint(init_from, on_main_process(
            accelerator, "find run.init_from's checkpoint", check))
    else:
        return TrainingState(step=0, epoch=0, batch_in_epoch=0, fixed_noise=fixed_noise, world_size=world,
                             batch_size=batch_size), None, None
    state = load_checkpoint(accelerator, path, gan_step)
    if (state.world_size, state.batch_size) != (world, batch_size):
        seen = state.batch_in_epoch * state.world_size * state.batch_size
        state.batch_in_epoch = seen // (world * batch_size)
    state.world_size, state.batch_size = world, batch_size
    for opt, lr in zip((gan_step.opt_g, gan_step.opt_d), learning_rates):
        for group in opt.param_groups:
            group["lr"] = lr
    return state, resumed_from, initialised_from
