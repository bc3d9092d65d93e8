"""launch/slurm/*.sbatch on a real one-node SLURM cluster: shards, then a training job that gets the
scheduler's pre-timeout warning, checkpoints, requeues itself and resumes to completion.

Runs only under CI=true or DCGAN_TEST_SLURM=1, as root: it may apt-get install slurmctld, slurmd,
slurm-client and munge, and starts them (launch/slurm/local_cluster.sh, private config and ports)
for the duration of this module. Elsewhere, or where SLURM cannot be installed, it is skipped.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcgan_dist.data.build.synth import write_synthetic_celeba
from dist_helpers import REPO, TINY, expected_noise_state, free_port

CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment (SLURM_CONF, ...) for clients of a one-node cluster started here and stopped after."""
    if os.environ.get("CI") != "true" and os.environ.get("DCGAN_TEST_SLURM") != "1":
        pytest.skip("SLURM test: set DCGAN_TEST_SLURM=1 (or CI=true) to apt-install and start a local cluster")
    if os.geteuid() != 0:
        pytest.skip("SLURM test: the local cluster's daemons need root")
    if not all(shutil.which(t) for t in TOOLS):
        if not shutil.which("apt-get"):
            pytest.skip("SLURM test: no apt-get to install slurmctld, slurmd, slurm-client and munge")
        done = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not all(shutil.which(t) for t in TOOLS):
            reason = (done.stderr.strip().splitlines() or ["tools still missing"])[-1]
            pytest.skip(f"SLURM test: SLURM could not be installed ({reason})")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, DCGAN_SLURM_DIR=str(state), DCGAN_SLURMCTLD_PORT=str(free_port()),
               DCGAN_SLURMD_PORT=str(free_port()), SLURM_CONF=str(state / "slurm.conf"))
    try:
        started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert started.returncode == 0, f"local cluster did not start: {started.stderr}"
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def sbatch(env: dict, out: Path, script: str, *args: str, extra_env: dict | None = None) -> str:
    """Submit from the repository root, as a user does; CPU-sized resources for the one local node."""
    job_env = dict(env, DCGAN_VENV=sys.prefix, **(extra_env or {}))
    done = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--cpus-per-task={os.cpu_count()}",
                           "--gpus-per-node=0", f"--output={out}", script, *args],
                          cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job(env: dict, job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                          timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_until(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


def test_shards_then_training_that_is_warned_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    source = write_synthetic_celeba(tmp_path / "celeba", 150, 4, seed=0)
    shards, run_dir = tmp_path / "shards", tmp_path / "run"

    build_log = tmp_path / "build.out"
    build = sbatch(slurm_env, build_log, "launch/slurm/build_shards.sbatch", "--source", str(source),
                   "--out", str(shards), "--shard-size", "25")
    wait_until("the shard job", lambda: job(slurm_env, build)["JobState"] == "COMPLETED", 180, build_log)
    assert (shards / "manifest.json").is_file(), build_log.read_text()

    total = 300
    log = tmp_path / "train.out"
    train = sbatch(slurm_env, log, "launch/slurm/train.sbatch", "--config", "configs/smoke.yaml",
                   f"data.source={shards}", f"run.dir={run_dir}", *TINY, f"train.max_steps={total}",
                   "train.epochs=1000", "log.every=50", "ckpt.every=100000",
                   extra_env={"ACCELERATE_USE_CPU": "1", "GPUS_PER_NODE": "2", "DCGAN_PRECISION": "no",
                              "OMP_NUM_THREADS": "1"})
    wait_until("the trainer to start", lambda: log.exists() and "[dcgan-train] 2 process(es) on cpu" in log.read_text(),
               180, log)
    time.sleep(2.0)  # some steps
    # what `#SBATCH --signal=B:USR1@120` makes the scheduler do 120 s before the time limit
    subprocess.run(["scancel", "--batch", "--signal=USR1", train], env=slurm_env, check=True, timeout=30)
    wait_until("the job to requeue itself", lambda: job(slurm_env, train).get("Restarts") == "1", 120, log)
    # slurmctld holds a requeued batch job for about two minutes; let it start now, but not within the second
    # its first run was killed in: slurmd refuses credentials issued in that second ("Job credential revoked",
    # seen once when the update came 0.1 s after the requeue), and the job then fails instead of running
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={train}", "StartTime=now"], env=slurm_env, timeout=30)
    wait_until("the requeued job to complete", lambda: job(slurm_env, train)["JobState"] == "COMPLETED", 300, log)

    output = log.read_text()
    first, _, second = output.partition("(restart 1)")
    assert "[train.sbatch] USR1: asking the trainer to checkpoint and stop" in first
    k = int(re.search(r"\[dcgan-train\] stopped by SIGUSR1 at step (\d+)/300", first).group(1))
    assert 0 < k < total
    assert f"requeueing job {train} to resume" in first
    assert f"resumed from {run_dir}/checkpoints/step-{k:08d}" in second
    assert f"[dcgan-train] done: step {total}/{total}, {total - k} steps" in second
    assert "[train.sbatch] srun finished with status 0" in second
    assert job(slurm_env, train)["ExitCode"] == "0:0"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [f"step-{k:08d}", f"step-{total:08d}"]
    state = torch.load(run_dir / "checkpoints" / names[-1] / "state.pt", weights_only=True)
    # both ranks drew exactly `total` noise batches across the two jobs: nothing repeated or lost
    for rank in (0, 1):
        assert torch.equal(state["rng"][rank], expected_noise_state(0, rank, total))
