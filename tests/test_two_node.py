"""Two nodes on one machine: two `accelerate launch` agents (--num_machines 2, one CPU process each) meet
over a c10d rendezvous on localhost, train, are preempted (USR1 to every trainer, as launch/slurm/train.sbatch
sends it), checkpoint, resume on two nodes, and end with exactly the weights of an uninterrupted one-node run
of the same global batch (two processes either way: the same ranks, data and all-reduces)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dcgan_dist.checkpoint import latest_checkpoint
from dist_helpers import REPO, TINY, free_port, launch_env, run_torchrun, synthetic_shards
from test_preemption import Running, stopped_step, worker_pid

ARGS = [*TINY, "train.epochs=1000", "log.every=1000", "ckpt.every=100000", "train.stop_check_every=2",
        "diag.enabled=false"]


def node_cmd(machine_rank: int, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/multi_node.yaml",
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "c10d",
            "--mixed_precision", "no", "-m", "dcgan_dist.train", *args]


def ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the launcher agents ignore it, as in train.sbatch


def wait_for_port(port: int, timeout: float = 60) -> None:
    """Until node 0's rendezvous store listens: node 1 starts after it, as a second machine would join."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"node 0 did not open its rendezvous port {port}")


def start_nodes(start, *args: str) -> list:
    """Node 0, then node 1 once node 0's store is up (on one host both would otherwise try to host it)."""
    port = free_port()
    first = start(node_cmd(0, port, *args))
    wait_for_port(port)
    return [first, start(node_cmd(1, port, *args))]


def run_two_nodes(*args: str, timeout: float = 180) -> list[str]:
    """Both nodes to completion; their outputs."""
    nodes = start_nodes(lambda cmd: subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, preexec_fn=ignore_usr1),
                        *args)
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            pytest.fail("two-node run did not finish (hang)")
        assert node.returncode == 0, outputs[-1][-3000:]
    return outputs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("two_node"))


def test_two_nodes_preempted_resume_and_match_one_node(tmp_path, shards):
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    args = [f"data.source={shards}", f"run.dir={two}", *ARGS]
    nodes = start_nodes(lambda cmd: Running(cmd, preexec_fn=ignore_usr1), *args, "train.max_steps=100000")
    nodes[0].wait_started(timeout=180)  # only the main process prints its start line
    trainers = [worker_pid(node.proc, rank) for node, rank in ((nodes[0], 0), (nodes[1], 1))]
    assert len(set(trainers)) == 2
    for pid in trainers:
        psutil.Process(pid).send_signal(signal.SIGUSR1)
    outputs = [node.wait(timeout=120) for node in nodes]
    assert all(node.proc.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 process(es) on cpu" in outputs[0]
    k = stopped_step(outputs[0], "SIGUSR1")
    assert k > 0 and k % 2 == 0
    assert latest_checkpoint(two).name == f"step-{k:08d}"

    total = k + 3
    resumed = run_two_nodes(*args, f"train.max_steps={total}")
    assert f"resumed from {two}/checkpoints/step-{k:08d}" in resumed[0]
    assert f"steps {k} -> {total}" in resumed[0]

    single = run_torchrun(2, "-m", "dcgan_dist.train", f"data.source={shards}", f"run.dir={one}", *ARGS,
                          f"train.max_steps={total}", timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = latest_checkpoint(two), latest_checkpoint(one)
    assert a.name == b.name == f"step-{total:08d}"
    for name in ("G.safetensors", "D.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[key], wb[key]) for key in wa), f"{name} differs between two nodes and one node"
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert torch.equal(sa["rng"], sb["rng"])
