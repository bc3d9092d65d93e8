"""Diagnostics: MS-SSIM against a direct 2-D convolution, diversity ordering, the mode classifier,
alarm logic, and a check that leaves G (weights and BatchNorm buffers) exactly as it was."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dcgan_dist.config import ConfigError, DiagConfig, load_config
from dcgan_dist.data.build.synth import write_synthetic_celeba
from dcgan_dist.diagnostics import DIAGNOSTICS_JSON, Diagnostics, RealReference
from dcgan_dist.diagnostics.alarms import (MODE_COLLAPSE, VANISHING_GRADIENTS, Alarm, collapse_condition,
                                           vanishing_condition)
from dcgan_dist.diagnostics.coverage import ModeClassifier, modes_present
from dcgan_dist.diagnostics.similarity import (distinct_count, feature_spread, mean_ms_ssim,
                                              pairwise_ms_ssim, RandomFeatures)
from dcgan_dist.data.images import lab_transform, list_images
from dcgan_dist.models import Generator
from dcgan_dist.step import StepOutput

MODES = 5


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """300 synthetic faces in 5 modes at 64x64 (the lab's transform), with their modes, read from the release files
    (the flat cartoons: their modes are the most distinct, which the classifier and similarity tests rely on)."""
    from PIL import Image

    root = write_synthetic_celeba(tmp_path_factory.mktemp("synth") / "celeba", 300, MODES, seed=3, style="flat")
    identity = dict(line.split() for line in (root / "identity_CelebA.txt").read_text().splitlines())
    files = list_images(root / "img_align_celeba")
    transform = lab_transform(64)
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    return images, torch.tensor([int(identity[f.name]) for f in files])


def reference_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """MS-SSIM (3 scales, 7x7 Gaussian, sigma 1.5) of two images in [0, 1] with a direct depthwise 2-D convolution."""
    r = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-r ** 2 / 4.5)
    kernel = (g[:, None] * g[None, :]) / g.sum() ** 2
    weights = torch.tensor([0.0448, 0.2856, 0.3001], dtype=torch.float64)
    weights = weights / weights.sum()
    x, y = x[None].double(), y[None].double()
    result = 1.0
    for scale in range(3):
        k = kernel.expand(3, 1, 7, 7)
        f = lambda t: F.conv2d(t, k, groups=3)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
        cs = ((2 * cxy + 0.03 ** 2) / (vx + vy + 0.03 ** 2))
        if scale == 2:
            cs = cs * (2 * mx * my + 0.01 ** 2) / (mx ** 2 + my ** 2 + 0.01 ** 2)
        result *= max(cs.mean().item(), 0.0) ** weights[scale].item()
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result


def test_pairwise_ms_ssim_matches_a_direct_convolution(synthetic):
    images = synthetic[0][:6]
    unit = images.float() / 255
    expected = [reference_ssim(unit[i], unit[j]) for i in range(6) for j in range(i + 1, 6)]
    assert pairwise_ms_ssim(images).tolist() == pytest.approx(expected, abs=1e-4)
    # [-1, 1] floats (G's output) give the same values as the uint8 images they stand for
    assert pairwise_ms_ssim(images.float() / 127.5 - 1).tolist() == pytest.approx(expected, abs=1e-4)


def test_diversity_orders_constructed_cases(synthetic):
    images, labels = synthetic
    identical = images[:1].repeat(32, 1, 1, 1)
    one_mode = images[labels == 0][:32]
    real = images[:32]
    noise = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    s_identical, s_mode, s_real, s_noise = (mean_ms_ssim(x) for x in (identical, one_mode, real, noise))
    assert s_identical == pytest.approx(1.0, abs=1e-5)
    assert s_identical > s_mode > s_real > s_noise
    assert s_real < 0.5 * s_mode  # a real batch is much less alike than one mode of it
    features = RandomFeatures()
    spreads = [feature_spread(features(x)) for x in (identical, one_mode, real)]
    assert spreads[0] == pytest.approx(0.0, abs=1e-4) and spreads[0] < spreads[1] < spreads[2]


def test_distinct_count_finds_the_faces_a_batch_repeats(synthetic):
    """Copies of a few faces, each slightly noised, count as those few; varied faces count one each; the
    threshold is read against each pair's MS-SSIM computed directly."""
    images, labels = synthetic
    faces = torch.stack([images[labels == m][0] for m in range(4)])  # one face of each of 4 modes
    noise = torch.Generator().manual_seed(0)
    jitter = lambda x: (x.float() + torch.randn(x.shape, generator=noise) * 4).clamp(0, 255).to(torch.uint8)  # noqa: E731
    repeated = jitter(faces.repeat(8, 1, 1, 1))  # 32 images: 4 faces, 8 near-copies each, interleaved
    assert distinct_count(pairwise_ms_ssim(repeated), 32) == 4
    varied = images[:24]
    pairs = pairwise_ms_ssim(varied)
    unit = varied.float() / 255
    direct = max(reference_ssim(unit[i], unit[j]) for i in range(24) for j in range(i + 1, 24))
    assert distinct_count(pairs, 24, threshold=direct + 1e-3) == 24
    assert distinct_count(pairs, 24, threshold=direct - 1e-3) == 23  # the most alike pair now counts once


def test_mode_classifier_is_accurate_on_held_out_real_samples(synthetic):
    images, labels = synthetic
    classifier = ModeClassifier.fit(images[:200], labels[:200], MODES)
    assert classifier.accuracy(images[200:], labels[200:]) >= 0.95
    predicted = classifier.predict(images[200:])
    assert modes_present(predicted, MODES, 1) == MODES
    one_mode = images[labels == 2]
    assert modes_present(classifier.predict(one_mode), MODES, 5) == 1


def test_alarm_fires_after_patience_and_rearms():
    alarm = Alarm(patience=2)
    assert [alarm.update(c) for c in (True, True, True, False, True, True)] == [False, True, False, False, False, True]


def test_alarm_conditions():
    kw = dict(ratio=0.1, floor=1e-3, d_fake_max=0.05)
    assert vanishing_condition(0.5, 10.0, 0.01, **kw)
    assert not vanishing_condition(0.5, 10.0, 0.2, **kw)  # D does not win: not vanishing
    assert not vanishing_condition(2.0, 10.0, 0.01, **kw)
    assert vanishing_condition(5e-4, 1e-3, 0.01, **kw)  # below the floor
    kw = dict(min_diversity_ratio=0.5, min_coverage=0.5, min_d_fake=0.1)
    assert collapse_condition(0.2, None, 0.4, **kw)
    assert collapse_condition(0.9, 0.3, 0.4, **kw)
    assert not collapse_condition(0.9, 0.8, 0.4, **kw)
    assert not collapse_condition(0.2, 0.1, 0.01, **kw)  # alike samples that D rejects: not collapse


class Recorder:
    """Stands in for RunLogger: keeps what would go to TensorBoard and the console."""

    def __init__(self):
        self.scalar_values, self.texts, self.messages = {}, [], []

    def scalars(self, step, values):
        self.scalar_values.update({(k, step): v for k, v in values.items()})

    def text(self, tag, step, text):
        self.texts.append((tag, step, text))

    def message(self, line):
        self.messages.append(line)


def fake_step_output(g_total: float, d_fake_prob: float) -> StepOutput:
    logit = torch.logit(torch.tensor(d_fake_prob))
    return StepOutput(real_logits=torch.full((8,), 3.0), fake_logits=torch.full((8,), float(logit)),
                      grad_norms_d={"0": torch.tensor(1.0), "total": torch.tensor(1.0)},
                      grad_norms_g={"0": torch.tensor(g_total), "total": torch.tensor(g_total)})


def test_check_leaves_G_unchanged_and_alarm_is_recorded(synthetic, tmp_path):
    images, labels = synthetic
    cfg = DiagConfig(every=1, samples=32, similarity_samples=16, reference_checks=2, vanishing_patience=2,
                     warmup_steps=0)
    diagnostics = Diagnostics(cfg, RealReference(images, labels, MODES), tmp_path, nz=16, device=torch.device("cpu"))
    assert diagnostics.reference["classifier_accuracy"] >= 0.95
    torch.manual_seed(0)
    G = Generator(nz=16, ngf=8)
    G.eval()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    log = Recorder()
    for step, (g, p) in enumerate([(10.0, 0.3), (10.0, 0.3), (0.5, 0.01), (0.4, 0.01), (0.3, 0.01)], start=1):
        diagnostics(step, fake_step_output(g, p), G, log)
    after = G.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not G.training
    saved = json.loads((tmp_path / DIAGNOSTICS_JSON).read_text())
    vanishing = [e for e in saved["alarms"] if e["alarm"] == VANISHING_GRADIENTS]
    assert [e["step"] for e in vanishing] == [4]  # checks 3 and 4 below 0.1 x early (10) while D(G(z)) = 0.01
    assert vanishing[0]["metrics"]["grad/G/early"] == pytest.approx(10.0)
    assert vanishing[0]["thresholds"]["vanishing_ratio"] == cfg.vanishing_ratio
    assert [t[:2] for t in log.texts if t[0] == f"alarms/{VANISHING_GRADIENTS}"] == [(f"alarms/{VANISHING_GRADIENTS}", 4)]
    assert any("WARNING" in m and VANISHING_GRADIENTS in m for m in log.messages)
    assert log.scalar_values[(f"alarm/{VANISHING_GRADIENTS}", 5)] == 1.0
    assert log.scalar_values[(f"alarm/{VANISHING_GRADIENTS}", 3)] == 0.0
    assert log.scalar_values[("grad/G/relative_to_early", 3)] == pytest.approx(0.05)
    assert 1 <= log.scalar_values[("diversity/distinct", 1)] <= 16  # of the 16 similarity samples
    # an untrained G's samples are far more alike than real faces: mode_collapse fires at once (no warm-up here)
    assert [e["step"] for e in saved["alarms"] if e["alarm"] == MODE_COLLAPSE] == [2]


def test_similarity_samples_above_samples_stop_dcgan_train_before_any_work(tmp_path, monkeypatch, capsys):
    from dcgan_dist.train import main

    monkeypatch.chdir(tmp_path)  # synthetic data would be written under shards/ here
    bad = ["diag.samples=16", "diag.similarity_samples=32", "data.synthetic_count=40", "run.dir=run"]
    with pytest.raises(ConfigError) as caught:
        load_config(None, bad)
    assert str(caught.value) == ("config key 'diag.similarity_samples': got 32, expected at most diag.samples (16): "
                                 "the MS-SSIM pairs are taken from those samples")
    assert main(bad) == 2
    assert capsys.readouterr().err.strip() == f"dcgan-train: error: {caught.value}"
    assert list(tmp_path.iterdir()) == []
    assert load_config(None, ["diag.samples=16", "diag.similarity_samples=16"]).diag.similarity_samples == 16
    with pytest.raises(ConfigError, match="diag.similarity_samples"):  # however the config is built
        DiagConfig(samples=16, similarity_samples=32)
