"""End-to-end trainer behaviour on a small image folder: tags, checkpoints, resume, bad configs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcgan_dist.checkpoint import (EMA_FILE, GENERATOR_EXPORT, RAW_GENERATOR_EXPORT, checkpoint_dirs,
                                   export_weights, latest_checkpoint, load_generator, resume_or_start,
                                   write_checksums)
from dcgan_dist.config import load_config
from dcgan_dist.parallel import build_accelerator
from dcgan_dist.stats import RunningStats
from dcgan_dist.train import build_gan, main, train

TINY = ["model.ngf=8", "model.ndf=8", "model.nz=16", "train.batch_size=8", "data.workers=1", "log.every=5",
        "log.images_every=10", "ckpt.every=10", "ckpt.keep=2"]
SCALAR_TAGS = {"loss/D", "loss/G", "D(x)", "D(G(z))/before_D_step", "D(G(z))/after_D_step", "lr/G", "lr/D",
               "perf/img_per_s", "D/positive_logits_real", "D/positive_logits_fake", "train/nonfinite_steps"}


def run(tmp: Path, folder: Path, *extra: str) -> dict:
    cfg = load_config(None, [*TINY, f"data.source={folder}", f"run.dir={tmp}", *extra])
    return train(cfg)


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_short_run_writes_every_documented_tag_and_a_checkpoint(tmp_path, image_folder):
    run(tmp_path, image_folder, "train.max_steps=12")
    ev = events(tmp_path)
    tags = ev.Tags()
    assert SCALAR_TAGS <= set(tags["scalars"])
    assert not {"amp/skipped_steps", "amp/scale"} & set(tags["scalars"])  # fp16 only
    assert {"images/real", "images/fake_fixed_noise", "images/fake_fixed_noise_ema"} <= set(tags["images"])
    assert "config/text_summary" in tags["tensors"]
    assert [e.step for e in ev.Scalars("loss/D")] == [5, 10, 12]
    assert [e.step for e in ev.Images("images/fake_fixed_noise")] == [10, 12]
    assert [e.step for e in ev.Images("images/fake_fixed_noise_ema")] == [10, 12]
    lr = ev.Scalars("lr/G")[0].value
    assert lr == pytest.approx(2e-4)
    # checkpoints: periodic (10) and final (12), keep=2, nothing half-written left
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000010", "step-00000012"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    state = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)
    assert state["step"] == 12 and state["fixed_noise"].shape == (64, 16, 1, 1)
    assert yaml.safe_load(state["config"])["model"]["ngf"] == 8
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["source"] == str(image_folder)
    # the inference exports rebuild G from their own metadata and match the checkpoint's weights: the
    # moving average (model.ema_decay is on by default) in generator.safetensors, G itself beside it
    for export, weights, in_checkpoint in ((GENERATOR_EXPORT, "ema", EMA_FILE),
                                           (RAW_GENERATOR_EXPORT, "raw", "G.safetensors")):
        G = load_generator(tmp_path / export)
        ckpt_g = load_file(str(latest_checkpoint(tmp_path) / in_checkpoint))
        assert export_weights(tmp_path / export) == weights
        for k, v in G.state_dict().items():
            assert torch.equal(v, ckpt_g[k])


def test_a_statistic_reported_by_name_reaches_tensorboard_by_that_name(tmp_path, image_folder, monkeypatch):
    end_step = RunningStats.end_step

    def with_two_more(stats, counted):  # what adding a statistic to GANStep.__call__ amounts to
        stats.report("test/quarter", torch.tensor(0.25))
        stats.count("test/steps", torch.tensor(1.0))
        end_step(stats, counted)

    monkeypatch.setattr(RunningStats, "end_step", with_two_more)
    run(tmp_path, image_folder, "train.max_steps=7")
    ev = events(tmp_path)
    assert [(e.step, e.value) for e in ev.Scalars("test/quarter")] == [(5, 0.25), (7, 0.25)]
    assert [(e.step, e.value) for e in ev.Scalars("test/steps")] == [(5, 5.0), (7, 2.0)]  # a count per interval
    assert SCALAR_TAGS <= set(ev.Tags()["scalars"])


def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_run(tmp_path, image_folder):
    # 96 images / batch 8 = 12 batches per epoch: step 10 stops mid-epoch, 20 crosses an epoch boundary
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight, image_folder, "train.max_steps=20")
    run(split, image_folder, "train.max_steps=10")
    run(split, image_folder, "train.max_steps=20")
    a, b = latest_checkpoint(straight), latest_checkpoint(split)
    assert a.name == b.name == "step-00000020"
    for name in ("G.safetensors", "D.safetensors", EMA_FILE):  # G's moving average resumes bitwise too
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k} differs after resume"
    sa = torch.load(a / "state.pt", weights_only=True)
    sb = torch.load(b / "state.pt", weights_only=True)
    assert (sa["epoch"], sa["batch_in_epoch"]) == (sb["epoch"], sb["batch_in_epoch"]) == (1, 8)
    assert torch.equal(sa["rng"], sb["rng"])
    assert sa["ema_updates"].item() == sb["ema_updates"].item() == 20
    # the TensorBoard curve continues: steps 5, 10 from the first run, 15, 20 from the resumed one
    assert [e.step for e in events(split).Scalars("loss/D")] == [5, 10, 15, 20]


def test_resume_on_another_world_size_keeps_the_sample_position_and_takes_the_configs_learning_rates(
        tmp_path, image_folder):
    run(tmp_path, image_folder, "train.max_steps=5")
    ckpt = latest_checkpoint(tmp_path)
    blob = torch.load(ckpt / "state.pt", weights_only=True)
    # as if written by 2 ranks of batch 4 after 3 batches of the epoch: 24 samples seen
    blob.update(world_size=2, batch_size=4, batch_in_epoch=3, rng=torch.stack([blob["rng"][0]] * 2))
    torch.save(blob, ckpt / "state.pt")
    write_checksums(ckpt)
    cfg = load_config(None, [*TINY, f"data.source={image_folder}", f"run.dir={tmp_path}"])
    accelerator = build_accelerator(cfg)
    gan_step = build_gan(cfg, accelerator)
    state, resumed_from, _ = resume_or_start(accelerator, tmp_path, gan_step, torch.zeros(1), batch_size=16,
                                             learning_rates=(1e-3, 3e-3))
    assert resumed_from == ckpt
    assert (state.step, state.epoch, state.batch_in_epoch, state.world_size, state.batch_size) == (5, 0, 1, 1, 16)
    assert [g["lr"] for g in gan_step.opt_g.param_groups] == [1e-3]  # the config's, not the saved 2e-4
    assert [g["lr"] for g in gan_step.opt_d.param_groups] == [3e-3]
    # 2 saved noise streams for 1 rank: a fresh stream, deterministic in (step, rank)
    assert torch.equal(gan_step.noise.get_state(), torch.Generator().manual_seed(5 * 7919 + 0).get_state())
    state, resumed_from, initialised_from = resume_or_start(accelerator, tmp_path / "new", gan_step, torch.zeros(1), 8,
                                                            (2e-4, 2e-4))
    assert resumed_from is None and initialised_from is None and (state.step, state.epoch, state.batch_in_epoch, state.world_size) == (0, 0, 0, 1)


def test_fresh_start_is_explicit(tmp_path, image_folder):
    run(tmp_path, image_folder, "train.max_steps=5")
    run(tmp_path, image_folder, "train.max_steps=5", "run.fresh=true")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000005"]
    assert [e.step for e in events(tmp_path).Scalars("loss/D")] == [5]


def test_interrupted_checkpoint_write_is_never_taken_for_a_checkpoint(tmp_path, image_folder):
    run(tmp_path, image_folder, "train.max_steps=5")
    half = tmp_path / "checkpoints" / ".tmp-step-00000010"
    half.mkdir()
    (half / "G.safetensors").write_bytes(b"partial")
    incomplete = tmp_path / "checkpoints" / "step-00000099"
    incomplete.mkdir()
    (incomplete / "G.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step-00000005"


BAD_CONFIGS = [
    (["train.batch_sz=4"], "config key 'train.batch_sz': unknown key"),
    (["nonsense.key=1"], "config key 'nonsense': unknown key"),
    (["train.batch_size=four"], "config key 'train.batch_size': got 'four', expected an integer"),
    (["train.batch_size=0"], "config key 'train.batch_size': got 0, expected a value > 0"),
    (["optim.lr_g=-1e-4"], "config key 'optim.lr_g': got '-1e-4', expected a value > 0"),
    (["optim.betas_d=[0.5, 1.5]"], "config key 'optim.betas_d'"),
    (["precision=fp8"], "config key 'precision': got 'fp8', expected one of 'auto', 'no', 'bf16', 'fp16'"),
    (["loss.generator=wasserstein"], "config key 'loss.generator': got 'wasserstein'"),
    (["run.fresh=maybe"], "config key 'run.fresh': got 'maybe', expected true or false"),
    (["train.batch_size"], "override 'train.batch_size': expected key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_config_gets_one_line_error_before_any_work(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    assert main([*overrides, f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not run_dir.exists()


def test_bad_config_files(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  batch_size: [1,\n")
    assert main(["--config", str(broken)]) == 2
    assert f"config file {broken} line" in capsys.readouterr().err
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert main(["--config", str(listy)]) == 2
    assert "expected a mapping of sections" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([f"data.source={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'r'}"]) == 2
    assert "config key 'data.source'" in capsys.readouterr().err


def test_console_script_and_module_are_the_same_program(tmp_path):
    for cmd in (["dcgan-train"], [sys.executable, "-m", "dcgan_dist.train"]):
        exe = Path(sys.executable).parent / cmd[0] if cmd[0] == "dcgan-train" else None
        argv = [str(exe)] if exe else cmd
        proc = subprocess.run([*argv, "train.epochs=0"], capture_output=True, text=True)
        assert proc.returncode == 2
        assert proc.stderr.strip() == "dcgan-train: error: config key 'train.epochs': got 0, expected a value > 0"


def test_help_answers_without_loading_torch():
    """`dcgan-train --help` must be instant: parsing the command line loads neither torch nor accelerate."""
    probe = ("import sys; from dcgan_dist.train import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'accelerate') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: dcgan-train" in proc.stdout and proc.stdout.strip().endswith("[]")


def test_init_from_starts_a_new_run_where_another_left_off(tmp_path, image_folder, capsys):
    """run.init_from: a new run folder starts from another run's newest checkpoint (weights, optimizers, step,
    data position, noise), with its own settings from there on: the same weights, bitwise, as that run resumed
    in a copy of its folder with the same settings; the source run is left as it was."""
    import shutil

    source, copy, new = tmp_path / "healthy", tmp_path / "copy", tmp_path / "unbalanced"
    run(source, image_folder, "train.max_steps=6", "ckpt.every=3")
    before = {p.name: (p / "checksums.json").read_text() for p in checkpoint_dirs(source)}
    shutil.copytree(source, copy)
    run(copy, image_folder, "train.max_steps=9", "optim.lr_d=1e-5")
    capsys.readouterr()
    run(new, image_folder, "train.max_steps=9", "optim.lr_d=1e-5", f"run.init_from={source}")
    assert f"run.init_from: starting from {source / 'checkpoints' / 'step-00000006'} (step 6" in capsys.readouterr().out
    assert [p.name for p in checkpoint_dirs(new)] == ["step-00000009"]
    for name in ("G.safetensors", "D.safetensors", "G_ema.safetensors"):
        ours, resumed = load_file(latest_checkpoint(new) / name), load_file(latest_checkpoint(copy) / name)
        assert ours.keys() == resumed.keys() and all(torch.equal(ours[k], resumed[k]) for k in ours), name
    assert [e.step for e in events(new).Scalars("loss/D")] == [9]  # its own curves, from the source's step on
    assert {p.name: (p / "checksums.json").read_text() for p in checkpoint_dirs(source)} == before
    # a checkpoint folder named directly: from step 3, the same settings as the source's, ends where it did
    direct = tmp_path / "from-step-3"
    run(direct, image_folder, "train.max_steps=6", f"run.init_from={source / 'checkpoints' / 'step-00000003'}")
    ours, theirs = load_file(latest_checkpoint(direct) / "G.safetensors"), load_file(latest_checkpoint(source) / "G.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # once the new run has checkpoints of its own, it resumes from them and run.init_from is not read again
    capsys.readouterr()
    run(new, image_folder, "train.max_steps=10", f"run.init_from={tmp_path / 'gone'}")
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "does not exist; expected a run folder or one of its checkpoints/step-NNNNNNNN"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no checkpoint"),
])
def test_init_from_without_a_checkpoint_is_one_line_and_exit_2(tmp_path, image_folder, capsys, make, message):
    source = make(tmp_path)
    code = main([*TINY, f"data.source={image_folder}", f"run.dir={tmp_path / 'run'}", f"run.init_from={source}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"dcgan-train: error: config key 'run.init_from': {source} ") and message in err
