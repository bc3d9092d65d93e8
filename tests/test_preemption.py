"""SIGUSR1 mid-run: a checkpoint at a step boundary, a clean exit, and a resume that continues the step count."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from dcgan_dist.checkpoint import latest_checkpoint
from dist_helpers import (REPO, TINY, expected_noise_state, launch_env, run_torchrun, synthetic_shards,
                          torchrun_cmd)

STARTED = "process(es) on cpu"  # the trainer's start line; its signal handlers are in place by then


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("preempt"))


class Running:
    """A trainer process whose output is collected by a thread, so the test can wait for a line."""

    def __init__(self, cmd: list[str], **popen):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, **popen)
        self.lines: list[str] = []
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if STARTED in line:
                self.started.set()

    def wait_started(self, timeout: float = 120) -> None:
        if not self.started.wait(timeout):
            self.proc.kill()
            pytest.fail("trainer did not start:\n" + "".join(self.lines)[-3000:])

    def wait(self, timeout: float = 120) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("trainer did not stop after the signal (hang):\n" + "".join(self.lines)[-3000:])
        time.sleep(0.2)  # let the reader thread take the last lines
        return "".join(self.lines)


def stopped_step(output: str, reason: str) -> int:
    marker = f"[dcgan-train] stopped by {reason} at step "
    assert marker in output, output[-3000:]
    return int(output.split(marker)[1].split("/")[0])


def test_sigusr1_checkpoints_and_the_next_start_resumes(tmp_path, shards):
    args = [f"data.source={shards}", f"run.dir={tmp_path}", *TINY, "train.epochs=1000", "log.every=1000",
            "ckpt.every=100000"]
    run = Running([sys.executable, "-m", "dcgan_dist.train", *args, "train.max_steps=100000"])
    run.wait_started()
    time.sleep(1.0)  # some steps
    run.proc.send_signal(signal.SIGUSR1)
    output = run.wait()
    assert run.proc.returncode == 0, output[-3000:]
    k = stopped_step(output, "SIGUSR1")
    assert 0 < k < 100000
    assert latest_checkpoint(tmp_path).name == f"step-{k:08d}"
    resumed = subprocess.run([sys.executable, "-m", "dcgan_dist.train", *args, f"train.max_steps={k + 3}"],
                             cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/step-{k:08d}" in resumed.stdout
    assert f"steps {k} -> {k + 3}" in resumed.stdout
    state = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)
    assert state["step"] == k + 3
    # the noise stream continued exactly: k + 3 draws in all, as in one uninterrupted run
    assert torch.equal(state["rng"][0], expected_noise_state(0, 0, k + 3))


def worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker with RANK=`rank`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    pytest.fail(f"no worker with RANK={rank}")


def test_sigusr1_to_one_rank_stops_both_at_the_same_step_and_resume_continues(tmp_path, shards):
    every = 4
    args = ["-m", "dcgan_dist.train", f"data.source={shards}", f"run.dir={tmp_path}", *TINY, "train.epochs=1000",
            "log.every=1000", "ckpt.every=100000", f"train.stop_check_every={every}"]
    run = Running(torchrun_cmd(2, *args, "train.max_steps=100000"))
    run.wait_started()
    rank1 = worker_pid(run.proc, 1)
    time.sleep(1.0)
    psutil.Process(rank1).send_signal(signal.SIGUSR1)  # as if the signal reached one node only
    output = run.wait()
    assert run.proc.returncode == 0, output[-3000:]
    k = stopped_step(output, "a stop signal on another rank")  # rank 0 reports; it got no signal itself
    assert k > 0 and k % every == 0
    state = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)
    assert state["step"] == k and state["rng"].shape[0] == 2
    resumed = run_torchrun(2, *args, f"train.max_steps={k + 2}", timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"steps {k} -> {k + 2}" in resumed.stdout
    state = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)
    assert state["step"] == k + 2
    for rank in (0, 1):
        assert torch.equal(state["rng"][rank], expected_noise_state(0, rank, k + 2))
