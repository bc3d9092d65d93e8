"""The GAN step against the reference DCGAN step written with plain torch (Sigmoid + BCELoss)."""
from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from torch import nn

from dcgan_dist.config import LossConfig
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.step import STAT_TAGS, GANStep


# Adam's first updates are lr * sign(gradient); for elements whose gradient is at rounding level
# (BatchNorm projects most of it out of G's first layer) two correct implementations then differ by
# 2 x lr. A large eps makes the update proportional to the gradient, so the comparison checks the
# gradients themselves to float32 precision.
ADAM_EPS = 1e-2


def make_step(loss: LossConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    ref_G, ref_D = copy.deepcopy(G), copy.deepcopy(D)
    acc = Accelerator(cpu=True)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=ADAM_EPS, fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=ADAM_EPS, fused=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    step = GANStep(acc, G, D, opt_g, opt_d, loss or LossConfig(), nz=16, seed=seed)
    return step, G, D, ref_G, ref_D


def reference_step(G, D, opt_g, opt_d, real, z, minimax=False):
    """pytorch/examples dcgan/main.py, one iteration, with D's Sigmoid applied explicitly."""
    criterion, sig = nn.BCELoss(), nn.Sigmoid()
    D.zero_grad()
    out = sig(D(real))
    criterion(out, torch.ones_like(out)).backward()
    fake = G(z)
    out = sig(D(fake.detach()))
    criterion(out, torch.zeros_like(out)).backward()
    opt_d.step()
    G.zero_grad()
    out = sig(D(fake))
    loss_g = torch.log1p(-out).mean() if minimax else criterion(out, torch.ones_like(out))
    loss_g.backward()
    opt_g.step()


def random_batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)


def test_step_matches_reference_implementation():
    for minimax in (False, True):
        step, G, D, ref_G, ref_D = make_step(LossConfig(generator="minimax" if minimax else "non_saturating"))
        ref_opt_g = torch.optim.Adam(ref_G.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=ADAM_EPS)
        ref_opt_d = torch.optim.Adam(ref_D.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=ADAM_EPS)
        for i in range(3):
            images = random_batch(seed=i)
            noise = torch.Generator().set_state(step.noise.get_state())
            z = torch.randn(16, 16, 1, 1, generator=noise)
            step(images)
            reference_step(ref_G, ref_D, ref_opt_g, ref_opt_d, images.float() / 127.5 - 1, z, minimax)
        for ours, ref in ((G, ref_G), (D, ref_D)):
            for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} differs from the reference")


def test_step_changes_both_networks_and_g_step_leaves_d_gradients_alone():
    step, G, D, _, _ = make_step()
    g_before = [p.detach().clone() for p in G.parameters()]
    d_before = [p.detach().clone() for p in D.parameters()]
    grad_calls = {"G": 0, "D": 0}
    for net, name in ((G, "G"), (D, "D")):
        for p in net.parameters():
            p.register_hook(lambda g, name=name: grad_calls.__setitem__(name, grad_calls[name] + 1))
    out = step(random_batch(), collect_grad_norms=True)
    n_g, n_d = len(list(G.parameters())), len(list(D.parameters()))
    # each D parameter gets exactly one gradient (the D step), each G parameter one (the G step)
    assert grad_calls == {"G": n_g, "D": n_d}
    assert all(p.grad is None for p in D.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(g_before, G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d_before, D.parameters()))
    assert all(p.requires_grad for p in D.parameters())
    assert set(out.grad_norms_g) >= {"total", "0"} and out.grad_norms_d["total"] > 0


def test_stats_are_means_over_steps_and_reset():
    step, *_ = make_step()
    step(random_batch(seed=1))
    first = step.sums.clone()
    step(random_batch(seed=2))
    second = step.sums - first
    means = step.take_means()
    assert means.shape == (len(STAT_TAGS),)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(means, (first + second) / 2)
    assert step.finite_steps == 0 and torch.count_nonzero(step.sums) == 0
    probs = means[2:].tolist()
    assert all(0.0 <= p <= 1.0 for p in probs)
