"""benchmarks/train_throughput.py in its small mode: every case runs and lands in the JSON and the table,
and the scaling model's pieces agree with DDP and the models."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcgan_dist.models import Discriminator, Generator, count_parameters

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"


def load_benchmark():
    """The script as a module (registered first: its dataclasses look their module up while being built)."""
    if "train_throughput" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["train_throughput"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("train-throughput")
    out = tmp / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--isolate", "no", "--out", str(out),
                           "--workdir", str(tmp / "work")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_small_run_measures_every_case_at_both_batch_sizes(small_run):
    report, stdout = small_run
    bench = load_benchmark()
    sizes = bench.SMALL
    assert report["mode"] == "small" and report["errors"] == [] and report["skipped"] == []
    assert {"torch", "accelerate", "webdataset"} <= set(report["versions"]) and report["machine"]["cpus"] >= 1
    assert "train_throughput.py --small" in report["command"]
    got = {(r["case"], r["label"], r["batch"], r.get("workers")) for r in report["rows"]}
    for batch in sizes.batches:
        for label, _, _ in bench.STEP_LADDER:
            assert ("step", label, batch, None) in got
        for workers in sizes.reference_workers:
            assert any(c == "(a) reference" and b == batch and w == workers for c, _, b, w in got)
        for workers in sizes.loader_workers:
            assert any(c == "loader" and lab.startswith("shards") and b == batch and w == workers
                       for c, lab, b, w in got)
        for case, what, _ in bench.TRAINER_KINDS.values():
            assert any(c == case and lab == what and b == batch for c, lab, b, _ in got)
    for r in report["rows"]:
        rounding = max(1e-3, 0.05 / r["img_per_s"])  # img/s is rounded to 0.1: at 35 img/s that is 0.14%
        assert r["img_per_s"] > 0 and r["ms_per_step"] == pytest.approx(1000 * r["batch"] / r["img_per_s"],
                                                                         rel=rounding, abs=1e-3)
        assert r["label"][:58] in stdout  # the printed table holds every row
    trainer_notes = [n for r in report["rows"] if r["case"].startswith("(c)") for n in r["notes"]]
    assert trainer_notes and all("eager steps (the device is cpu" in n for n in trainer_notes)


def test_small_run_fast_path_trains_the_same_model_on_cpu(small_run):
    report, _ = small_run
    curves = report["curves"]["against_baseline"]
    # on a CPU the fast path is the eager step: the same numbers to the last bit
    assert set(curves["bf16 fast path, seed 0"]["max_windowed_abs_diff"].values()) == {0.0}
    assert curves["bf16 fast path, seed 0"]["batchnorm_running_stats_rel_diff"] == 0.0
    # another seed differs: the comparison can see a difference when there is one
    assert max(curves["bf16 eager, seed 1"]["max_windowed_abs_diff"].values()) > 0
    assert all(norms and all(n > 0 for n in norms) for norms in report["curves"]["diagnostic_steps_grad_norm_g"].values())
    resume = report["resume"]
    assert resume["generator_rel_diff_resumed_vs_uninterrupted"] == 0.0
    assert resume["last_scalars"]["resumed"] == resume["last_scalars"]["uninterrupted"]
    assert any("resumed from" in n for n in resume["notes"])


def test_scaling_model_buckets_hold_every_gradient_and_predictions_cover_2_8_64(small_run):
    report, _ = small_run
    bench = load_benchmark()
    model = report["scaling_model"]
    for name, net in (("G", Generator(100, 64)), ("D", Discriminator(64))):
        assert sum(bench.gradient_buckets(net, 2.0)) == 4 * count_parameters(net)
        assert model["bucket_mb"][name] == [round(b / 1e6, 2) for b in bench.gradient_buckets(net, 2.0)]
        # the point of the 2 MB default: less is left to send after the backward than with DDP's 25 MB
        assert bench.gradient_buckets(net, 2.0)[-1] < bench.gradient_buckets(net, 25.0)[-1]
    predictions = model["predictions"]
    assert {(p["batch_per_gpu"], p["gpus"]) for p in predictions} == {(b, n) for b in (128, 1024) for n in (2, 8, 64)}
    assert len(predictions) == 2 * sum(len(link["gpus"]) for link in bench.LINKS.values())
    assert all(0 < p["efficiency_vs_1gpu_fast_path"] <= p["efficiency_vs_1gpu_eager"] <= 1 for p in predictions)
    # a two-GPU ring all-reduce sends each byte once: latency + bytes / bandwidth
    link = {"bus_gb_s": 100.0, "latency_us": 10.0, "gpus": [2]}
    assert bench.allreduce_ms(10**8, 2, link) == pytest.approx(0.01 + 1.0)
