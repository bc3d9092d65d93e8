"""DDP on CPU with gloo and real processes (torchrun, two ranks): what each rank did, recorded per rank."""
from __future__ import annotations

import json

import pytest
import torch

from dcgan_dist.checkpoint import checkpoint_dirs, latest_checkpoint
from dcgan_dist.config import ConfigError, load_config
from dcgan_dist.parallel import build_accelerator
from dist_helpers import (REPO, TINY, expected_noise_state, run_accelerate_cpu, run_torchrun, synthetic_shards,
                          train_split_counts)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("ddp"))


def test_two_ranks_step_in_lockstep_on_disjoint_samples(tmp_path, shards):
    steps, per_epoch = 10, sum(train_split_counts(shards)) // (2 * 8)
    proc = run_torchrun(2, "tests/ddp_probe.py", str(tmp_path), str(steps), "3", f"data.source={shards}",
                        *TINY, "train.epochs=2", "train.stop_check_every=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2) and r0["pid"] != r1["pid"]
    assert len(r0["params"]) == len(r1["params"]) == steps
    # G and D parameters are identical on both ranks after every step, and they do change
    assert r0["params"] == r1["params"]
    assert len({tuple(p) for p in r0["params"]}) == steps
    # local BatchNorm: running statistics come from each rank's own batch and are not broadcast
    assert all(b0[1] != b1[1] for b0, b1 in zip(r0["buffers"], r1["buffers"]))
    # disjoint samples within each epoch, none repeated on a rank
    for epoch in range(2):
        batches = slice(epoch * per_epoch, min((epoch + 1) * per_epoch, steps))
        k0 = [k for b in r0["keys"][batches] for k in b]
        k1 = [k for b in r1["keys"][batches] for k in b]
        assert len(set(k0)) == len(k0) and len(set(k1)) == len(k1) and not set(k0) & set(k1)
    # the G step neither computes D's weight gradients nor all-reduces D: one D backward's worth per step
    assert all(r0["d_grads_none"]) and all(r1["d_grads_none"])
    assert r0["allreduces_per_d_backward"] >= 1
    assert r0["d_allreduces"] == r1["d_allreduces"] == [r0["allreduces_per_d_backward"]] * steps
    # rank 1 alone got SIGUSR1 at step 3; both ranks agreed to stop at the next check (step 4)
    assert r0["stopped_at"] == r1["stopped_at"] == 4
    assert (r0["stop_reason"], r1["stop_reason"]) == ("a stop signal on another rank", "SIGUSR1")
    # the step statistics are averaged over the ranks by name; each rank's own differ (its own batches)
    local0, local1 = r0["stats_local"], r1["stats_local"]
    assert local0.keys() == local1.keys() == r0["stats_reduced"].keys() and "loss/D" in local0
    assert r0["stats_reduced"] == r1["stats_reduced"] and local0["loss/D"] != local1["loss/D"]
    for name, value in r0["stats_reduced"].items():
        assert value == pytest.approx((local0[name] + local1[name]) / 2, rel=1e-6), name


def test_trainer_under_accelerate_launch_on_uneven_shards_rank0_writes(tmp_path, shards):
    counts = train_split_counts(shards)
    assert len(set(counts)) > 1 and sum(counts) % (2 * 8) != 0  # uneven shards, samples left over
    per_epoch, epochs = sum(counts) // (2 * 8), 2
    run_dir = tmp_path / "run"
    proc = run_accelerate_cpu("-m", "dcgan_dist.train", f"data.source={shards}", f"run.dir={run_dir}", *TINY,
                        f"train.epochs={epochs}", "log.every=4", "log.images_every=100", "ckpt.every=5",
                        "ckpt.keep=5", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "2 process(es) on cpu" in out and "batch 8 per process = 16 global" in out
    assert out.count("[dcgan-train] done:") == 1  # only rank 0 prints
    total = epochs * per_epoch
    assert [p.name for p in checkpoint_dirs(run_dir)][-1] == f"step-{total:08d}"
    assert len(list((run_dir / "tb").iterdir())) == 1  # one event file: rank 1 wrote none
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    state = torch.load(latest_checkpoint(run_dir) / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == total
    # each rank's noise generator drew exactly `total` batches: both ranks ran every step
    assert state["rng"].shape[0] == 2
    for rank in (0, 1):
        assert torch.equal(state["rng"][rank], expected_noise_state(0, rank, total))


def test_launch_mismatch_and_cpu_only_options_are_clear_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, but without ACCELERATE_USE_CPU=1 on a CPU machine
    with pytest.raises(ConfigError, match="2 processes were started but Accelerate sees 1; on CPU set ACCELERATE_USE_CPU=1"):
        build_accelerator(load_config(None, []))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="config key 'ddp.batchnorm': got 'sync' on cpu, expected CUDA"):
        build_accelerator(load_config(None, ["ddp.batchnorm=sync"]))
    with pytest.raises(ConfigError, match="config key 'ddp.batchnorm': got 'global', expected one of 'local', 'sync'"):
        load_config(None, ["ddp.batchnorm=global"])


def test_launch_configs_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.name for p in (REPO / "launch" / "accelerate").glob("*.yaml")}
    assert names == {"one_gpu.yaml", "one_node.yaml", "multi_node.yaml", "cpu.yaml"}
    kinds = {}
    for name in names:
        cfg = load_config_from_file(str(REPO / "launch" / "accelerate" / name))
        kinds[name] = (str(cfg.distributed_type).split(".")[-1], cfg.num_machines, cfg.mixed_precision)
    assert kinds["one_gpu.yaml"] == ("NO", 1, "bf16")
    assert kinds["one_node.yaml"] == ("MULTI_GPU", 1, "bf16")
    assert kinds["multi_node.yaml"][0] == "MULTI_GPU" and kinds["multi_node.yaml"][1] > 1
    assert kinds["cpu.yaml"] == ("MULTI_GPU", 1, "no")
