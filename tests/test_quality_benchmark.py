"""benchmarks/quality.py in its small mode: both recipes train on the same images, every model of every seed
is measured against the held-out images, and the JSON and the table hold what docs/quality.md shows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality.py"


def test_small_run_measures_every_model_of_every_seed(tmp_path, fid_stand_in):
    out, work = tmp_path / "quality.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--inception", str(fid_stand_in), "--out", str(out),
                           "--workdir", str(work), "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert (settings["steps"], settings["samples"], settings["holdout"], settings["images"]) == (12, 16, 16, 96)
    assert [(r["model"], r["seed"]) for r in report["runs"]] == [
        (m, s) for s in (0, 1) for m in ("reference", "ours", "ours EMA")]
    assert all(r["fid"] > 0 and r["kid"] == r["kid"] for r in report["runs"])
    # the split: links, never copies, and no image in both sets
    train = {p.resolve() for p in (work / "train" / "faces").iterdir()}
    test = {p.resolve() for p in (work / "test").iterdir()}
    assert len(train) == 80 and len(test) == 16 and not train & test
    assert all(p.is_symlink() for p in (work / "test").iterdir())
    # our runs really trained the configured number of steps, with their average
    for seed in (0, 1):
        assert (work / f"run-{seed}" / "checkpoints" / "step-00000012" / "G_ema.safetensors").is_file()
    assert set(report["summary"]) == {"reference", "ours", "ours EMA"}
    assert "| ours EMA |" in proc.stdout and "KID x 1000 (unbiased)" in proc.stdout


def test_small_run_compares_our_precisions_with_their_diagnostics(tmp_path, fid_stand_in):
    """--precisions no bf16: one trainer run per precision, each row says the precision that ran and, with
    --diag-every, the run's last diversity ratio and its alarms as the run's own files record them."""
    from dcgan_dist.report import load_run

    out, work = tmp_path / "quality.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--inception", str(fid_stand_in), "--out", str(out),
                           "--workdir", str(work), "--workers", "0", "--seeds", "0", "--threads", "1",
                           "--precisions", "no", "bf16", "--diag-every", "6"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["threads"] == 1 and report["settings"]["precisions"] == ["no", "bf16"]
    rows = {r["model"]: r for r in report["runs"]}
    assert list(rows) == ["reference", "ours fp32", "ours fp32 EMA", "ours bf16", "ours bf16 EMA"]
    assert [rows[m]["precision"] for m in rows] == ["no", "no", "no", "bf16", "bf16"]
    for precision, label in (("no", "ours fp32"), ("bf16", "ours bf16")):
        run = load_run(work / f"run-{precision}-0")
        assert rows[label]["diversity_ratio"] == run.final("diversity/ratio") is not None
        assert rows[label]["alarms"] == sorted({a["alarm"] for a in run.alarms})
        assert f"| {label} |" in proc.stdout
    assert "diversity" in proc.stdout and "alarms:" in proc.stdout
