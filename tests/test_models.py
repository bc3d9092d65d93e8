"""The lab's G and D: exact layers, parameter counts, shapes, initialisation, losses."""
from __future__ import annotations

import torch
from torch import nn

from dcgan_dist.models import Discriminator, Generator, count_parameters, sample_with_batch_statistics
from dcgan_dist.step import discriminator_loss, generator_loss


def conv_params(cin: int, cout: int, k: int = 4) -> int:
    return cin * cout * k * k


def test_parameter_counts_match_the_lab():
    # The lab's figures, and the same counts derived from the layer list (conv weights + BN affine).
    ngf = ndf = 64
    g_expected = (conv_params(100, ngf * 8) + conv_params(ngf * 8, ngf * 4) + conv_params(ngf * 4, ngf * 2)
                  + conv_params(ngf * 2, ngf) + conv_params(ngf, 3) + 2 * (ngf * 8 + ngf * 4 + ngf * 2 + ngf))
    d_expected = (conv_params(3, ndf) + conv_params(ndf, ndf * 2) + conv_params(ndf * 2, ndf * 4)
                  + conv_params(ndf * 4, ndf * 8) + conv_params(ndf * 8, 1) + 2 * (ndf * 2 + ndf * 4 + ndf * 8))
    assert count_parameters(Generator()) == g_expected == 3_576_704
    assert count_parameters(Discriminator()) == d_expected == 2_765_568


def test_layers_are_the_labs():
    G, D = Generator(), Discriminator()
    g_convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.stride[0], m.padding[0]) for m in g_convs] == [(1, 0), (2, 1), (2, 1), (2, 1), (2, 1)]
    assert all(m.kernel_size == (4, 4) and m.bias is None for m in g_convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 4
    assert isinstance(list(G.modules())[-1], nn.Tanh)
    d_convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.stride[0], m.padding[0]) for m in d_convs] == [(2, 1), (2, 1), (2, 1), (2, 1), (1, 0)]
    assert all(m.kernel_size == (4, 4) and m.bias is None for m in d_convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3
    assert all(m.negative_slope == 0.2 for m in D.modules() if isinstance(m, nn.LeakyReLU))


def test_shapes_and_output_range():
    torch.manual_seed(0)
    G, D = Generator(), Discriminator()
    z = torch.randn(5, 100) * 10  # large inputs must still map into [-1, 1]
    x = G(z)
    assert x.shape == (5, 3, 64, 64)
    assert x.min() >= -1 and x.max() <= 1
    assert G(z.view(5, 100, 1, 1)).shape == (5, 3, 64, 64)
    assert D(x).shape == (5,)
    small = Generator(nz=16, ngf=8, channels=1)
    assert small(torch.randn(2, 16)).shape == (2, 1, 64, 64)


def test_dcgan_initialisation_statistics():
    torch.manual_seed(0)
    G = Generator()
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    gamma = torch.cat([m.weight for m in bn])
    assert abs(gamma.mean().item() - 1) < 5e-3 and abs(gamma.std().item() - 0.02) < 5e-3
    assert all(torch.count_nonzero(m.bias) == 0 for m in bn)


def test_logits_losses_equal_sigmoid_then_bceloss():
    torch.manual_seed(0)
    real_logits, fake_logits = torch.randn(64) * 3, torch.randn(64) * 3
    sig, bce = nn.Sigmoid(), nn.BCELoss()
    expected_d = bce(sig(real_logits), torch.ones(64)) + bce(sig(fake_logits), torch.zeros(64))
    torch.testing.assert_close(discriminator_loss(real_logits, fake_logits), expected_d)
    smoothed = bce(sig(real_logits), torch.full((64,), 0.9)) + bce(sig(fake_logits), torch.zeros(64))
    torch.testing.assert_close(discriminator_loss(real_logits, fake_logits, 0.9), smoothed)
    torch.testing.assert_close(generator_loss(fake_logits, "non_saturating"), bce(sig(fake_logits), torch.ones(64)))
    torch.testing.assert_close(generator_loss(fake_logits, "minimax"), torch.log1p(-sig(fake_logits)).mean())
    # bf16 logits: the loss is still computed in fp32
    assert discriminator_loss(real_logits.bfloat16(), fake_logits.bfloat16()).dtype == torch.float32


def test_samples_use_batch_statistics_and_leave_buffers_alone():
    torch.manual_seed(0)
    G = Generator(nz=16, ngf=8)
    G.main[1].running_mean.fill_(5.0)  # stale running statistics, as early in training
    before = {k: v.clone() for k, v in G.state_dict().items()}
    z = torch.randn(8, 16)
    G.eval()
    images = sample_with_batch_statistics(G, z)
    expected = Generator(nz=16, ngf=8)
    expected.load_state_dict(before)
    torch.testing.assert_close(images, expected.train()(z))  # batch statistics, not the stale running ones
    assert not G.training
    for k, v in G.state_dict().items():
        assert torch.equal(v, before[k]), k
