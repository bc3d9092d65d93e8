"""The run folder under the trainer: one trainer per folder (a second one is refused in one line naming the
first, exit 2, writing nothing, on every rank of a DDP launch); nothing is written there before the data
source is found; an empty run.dir is refused; a restart after a crash before the first checkpoint does not
repeat TensorBoard steps."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dcgan_dist.checkpoint
from dcgan_dist.config import load_config
from dcgan_dist.train import main, train
from dist_helpers import REPO, TINY, launch_env, run_torchrun, synthetic_shards
from test_preemption import Running
from test_runlock import start_holder

ARGS = [*TINY, "log.every=1000", "ckpt.every=100000", "diag.enabled=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("run_lock"))


def snapshot(folder) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_second_trainer_on_a_running_ones_folder_is_refused_naming_it_and_writes_nothing(tmp_path, shards):
    first = Running([sys.executable, "-m", "dcgan_dist.train", f"data.source={shards}", f"run.dir={tmp_path}", *ARGS,
                     "train.epochs=1000"])
    first.wait_started()
    try:
        before = snapshot(tmp_path)
        second = subprocess.run([sys.executable, "-m", "dcgan_dist.train", f"data.source={shards}",
                                 f"run.dir={tmp_path}", *ARGS, "train.max_steps=3", "run.fresh=true"],
                                cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
        after = snapshot(tmp_path)
    finally:
        first.proc.send_signal(signal.SIGUSR1)
    assert second.returncode == 2
    assert second.stderr.strip().startswith(f"dcgan-train: error: run.dir {tmp_path}: in use by pid {first.proc.pid} "
                                            f"on host {socket.gethostname()} since "), second.stderr
    assert second.stderr.strip().count("\n") == 0
    assert {k: v for k, v in after.items() if not k.startswith("tb")} == \
        {k: v for k, v in before.items() if not k.startswith("tb")}  # its run.fresh deleted nothing, wrote nothing
    output = first.wait()
    assert first.proc.returncode == 0 and "stopped by SIGUSR1" in output, output[-3000:]


def test_ddp_launch_on_a_locked_folder_ends_every_rank_and_writes_nothing(tmp_path, shards):
    holder = start_holder(tmp_path)
    try:
        proc = run_torchrun(2, "-m", "dcgan_dist.train", f"data.source={shards}", f"run.dir={tmp_path}", *ARGS,
                            "train.max_steps=3", timeout=120)  # a hang fails here
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert proc.stderr.count(f"dcgan-train: error: run.dir {tmp_path}: in use by pid {holder.pid} on host ") == 1
    assert ("dcgan-train: error: rank 1: stopping because the main process could not prepare the run folder "
            f"{tmp_path} (its message says why)") in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.lock"]


def test_missing_data_source_fails_before_the_run_folder_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([f"data.source={tmp_path / 'nowhere'}", f"run.dir={run_dir}", "data.workers=0"]) == 2
    assert "config key 'data.source'" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize("key,expected", [("run.dir", "a folder, e.g. runs/celeba64"),
                                          ("data.source", "a shard folder, a folder of images or synthetic")])
def test_empty_path_is_refused_at_load_not_taken_for_the_current_folder(tmp_path, monkeypatch, capsys, key, expected):
    monkeypatch.chdir(tmp_path)
    assert main([f"{key}="]) == 2
    assert capsys.readouterr().err.strip() == (f"dcgan-train: error: config key '{key}': got '', expected {expected} "
                                               "(empty would mean the current folder)")
    assert not list(tmp_path.iterdir())


def test_restart_after_a_crash_before_the_first_checkpoint_repeats_no_tensorboard_step(tmp_path, image_folder,
                                                                                        monkeypatch):
    args = ["model.ngf=8", "model.ndf=8", "model.nz=16", "train.batch_size=8", "data.workers=0", "log.every=5",
            "ckpt.every=1000", "diag.enabled=false", "train.max_steps=12", f"data.source={image_folder}",
            f"run.dir={tmp_path}"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(dcgan_dist.checkpoint, "save_checkpoint", disk_full)
        with pytest.raises(OSError):
            train(load_config(None, args))
    train(load_config(None, args))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/D")] == [5, 10, 12]
    assert [e.step for e in events.Images("images/real")] == [0]
    shown = plugin_event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    shown.Reload()  # the reader TensorBoard itself uses (the one above keeps text events a restart purged)
    assert [e.step for e in shown.Tensors("config/text_summary")] == [0]
    assert [e.step for e in shown.Tensors("loss/D")] == [5, 10, 12]
