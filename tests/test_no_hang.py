"""No error path hangs: a fault anywhere in the loop, with two loader workers running, ends the trainer
non-zero within seconds and leaves no worker behind; so do SIGINT to the main process alone, a file where
the checkpoint folder should be, and a rank of a DDP run that crashes.

Faults are injected by a wrapper that patches the real code from outside (`INJECT`, run as its own
process) and prints `FAULT <point> workers [pids]` just before it raises, so the bound is measured from
the fault itself and the test knows which worker processes must be gone afterwards.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from dist_helpers import REPO, TINY, launch_env, synthetic_shards, torchrun_cmd
from test_preemption import Running

BOUND = 30  # seconds from the fault to the exit; a clean exit takes one or two
ARGS = [*TINY, "data.workers=2", "train.epochs=3", "log.every=1000", "ckpt.every=4", "diag.enabled=false"]

INJECT = textwrap.dedent("""
    import errno, multiprocessing, os, sys

    import dcgan_dist.checkpoint as checkpoint
    from dcgan_dist.checkpoint import TrainingState
    from dcgan_dist.fastpath import StepRunner
    from dcgan_dist.train import main

    point, _, rank = sys.argv[1].partition("@")  # e.g. mid_epoch@1: on rank 1 only (default: rank 0)
    faulty_rank = os.environ.get("RANK", "0") == (rank or "0")

    def fault(error):
        workers = [p.pid for p in multiprocessing.active_children()]
        print(f"FAULT {point} workers {workers}", flush=True)
        raise error

    def on_call(owner, name, nth, error):
        original, calls = getattr(owner, name), []
        def patched(*args, **kwargs):
            calls.append(1)
            if faulty_rank and len(calls) == nth:
                fault(error)
            return original(*args, **kwargs)
        setattr(owner, name, patched)

    if point == "before_first_step":
        on_call(StepRunner, "__call__", 1, RuntimeError("injected before the first step"))
    elif point == "mid_epoch":
        on_call(StepRunner, "__call__", 3, RuntimeError("injected mid-epoch"))
    elif point == "checkpoint_write":
        on_call(checkpoint, "save_file", 1, OSError(errno.ENOSPC, "No space left on device"))
    elif point == "epoch_end":
        count_step = TrainingState.count_step
        def count_then_fault(state, batches_per_epoch):
            count_step(state, batches_per_epoch)
            if faulty_rank and state.batch_in_epoch == 0:
                fault(RuntimeError("injected at the end of an epoch"))
        TrainingState.count_step = count_then_fault
    sys.exit(main(sys.argv[2:]))
""")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("no_hang"))


class Faulty(Running):
    """A trainer with an injected fault: notes when the FAULT line comes and which workers it names."""

    def __init__(self, cmd: list[str]):
        self.fault_at: float | None = None
        self.workers: list[int] = []
        super().__init__(cmd)

    def _read(self) -> None:
        for line in self.proc.stdout:
            if "FAULT " in line and self.fault_at is None:  # the progress bar may share the line (stderr)
                self.fault_at = time.monotonic()
                listed = line.split("FAULT ", 1)[1].split("[", 1)[1].split("]", 1)[0]
                self.workers = [int(p) for p in listed.split(",") if p.strip()]
            self.lines.append(line)

    def wait_for_exit(self, timeout: float = 180) -> str:
        """Output once the process has exited; fails when it is still running BOUND s after the fault."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if self.fault_at is not None and time.monotonic() - self.fault_at > BOUND:
                break
            time.sleep(0.1)
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"no exit within {BOUND} s of the fault (hang):\n" + "".join(self.lines)[-3000:])
        time.sleep(0.2)  # let the reader thread take the last lines
        return "".join(self.lines)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("point", ["before_first_step", "mid_epoch", "checkpoint_write", "epoch_end"])
def test_fault_with_loader_workers_running_exits_non_zero_within_seconds(tmp_path, shards, point):
    run = Faulty([sys.executable, "-c", INJECT, point, f"data.source={shards}", f"run.dir={tmp_path}", *ARGS])
    output = run.wait_for_exit()
    assert run.fault_at is not None, output[-3000:]
    assert run.proc.returncode != 0
    assert len(run.workers) == 2, f"the fault should come while both loader workers run: {run.workers}"
    assert not [pid for pid in run.workers if running(pid)], "loader workers outlived the trainer"
    if point == "checkpoint_write":  # a full disk: one line naming the checkpoint, nothing half-written left
        last = output.strip().splitlines()[-1]
        assert run.proc.returncode == 1 and "Traceback" not in output, output[-3000:]
        assert last.startswith(f"dcgan-train: error: checkpoint {tmp_path}/checkpoints/step-00000004: could not be "
                               "written (OSError: [Errno 28] No space left on device)"), last
        assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
    else:  # an unexpected error keeps its traceback for the bug report
        assert "RuntimeError: injected" in output, output[-3000:]


def test_sigint_to_the_main_process_alone_exits_non_zero_within_seconds(tmp_path, shards):
    run = Running([sys.executable, "-m", "dcgan_dist.train", f"data.source={shards}", f"run.dir={tmp_path}", *ARGS,
                   "train.epochs=1000"])
    run.wait_started()
    deadline = time.monotonic() + 60
    while len(psutil.Process(run.proc.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # the loader workers start with the first batch
    workers = [child.pid for child in psutil.Process(run.proc.pid).children()]
    time.sleep(1.0)
    run.proc.send_signal(signal.SIGINT)
    output = run.wait(timeout=BOUND)
    assert run.proc.returncode == 130, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("dcgan-train: interrupted; start the same command again")
    assert len(workers) == 2 and not [pid for pid in workers if running(pid)]


def test_checkpoints_that_is_a_file_is_one_line_naming_it(tmp_path, shards):
    (tmp_path / "checkpoints").write_text("not a folder")
    proc = subprocess.run([sys.executable, "-m", "dcgan_dist.train", f"data.source={shards}", f"run.dir={tmp_path}",
                           *ARGS], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"dcgan-train: error: config key 'run.dir': {tmp_path}/checkpoints is a file, "
                                   "expected a folder there (or nothing); move the file away or choose another run.dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # nothing written, not even config.yaml


def test_ddp_rank_that_crashes_takes_the_other_down_within_seconds(tmp_path, shards):
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    run = Faulty(torchrun_cmd(2, str(script), "mid_epoch@1", f"data.source={shards}", f"run.dir={tmp_path / 'run'}",
                              *ARGS))
    output = run.wait_for_exit()  # torchrun returns once both ranks are gone
    assert run.fault_at is not None and run.proc.returncode != 0, output[-3000:]
    assert "RuntimeError: injected mid-epoch" in output


def test_ddp_main_process_that_cannot_write_a_checkpoint_ends_every_rank(tmp_path, shards):
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    run = Faulty(torchrun_cmd(2, str(script), "checkpoint_write", f"data.source={shards}",
                              f"run.dir={tmp_path / 'run'}", *ARGS))
    output = run.wait_for_exit()
    assert run.fault_at is not None and run.proc.returncode != 0, output[-3000:]
    assert "dcgan-train: error: checkpoint" in output and "No space left on device" in output, output[-3000:]
    assert ("dcgan-train: error: rank 1: stopping because the main process could not write checkpoint "
            f"{tmp_path}/run/checkpoints/step-00000004 (its message says why)") in output, output[-3000:]
