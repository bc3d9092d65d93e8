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
