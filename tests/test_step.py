"""The GAN step against the reference DCGAN step written with plain torch (Sigmoid + BCELoss), its named
statistics, its snapshot of the state, and the private torch protocol its skipped steps rely on."""
from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from torch import nn

from dcgan_dist.config import LossConfig
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.step import GANStep, gradients_nonfinite, step_unless


# Adam's first updates are lr * sign(gradient); for elements whose gradient is at rounding level
# (BatchNorm projects most of it out of G's first layer) two correct implementations then differ by
# 2 x lr. A large eps makes the update proportional to the gradient, so the comparison checks the
# gradients themselves to float32 precision.
ADAM_EPS = 1e-2


def make_step(loss: LossConfig | None = None, seed: int = 0, g_steps: int = 1):
    torch.manual_seed(seed)
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    ref_G, ref_D = copy.deepcopy(G), copy.deepcopy(D)
    acc = Accelerator(cpu=True)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=ADAM_EPS, fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=ADAM_EPS, fused=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    step = GANStep(acc, G, D, opt_g, opt_d, loss or LossConfig(), nz=16, seed=seed, g_steps=g_steps)
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


def test_g_steps_adds_g_updates_on_new_noise_against_the_same_d():
    """train.g_steps=3: the reference iteration, then two more G updates, each on the next z of the step's noise
    stream, through the D of this step (plain torch: D's parameters frozen, G's loss, Adam)."""
    step, G, D, ref_G, ref_D = make_step(g_steps=3)
    ref_opt_g = torch.optim.Adam(ref_G.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=ADAM_EPS)
    ref_opt_d = torch.optim.Adam(ref_D.parameters(), lr=2e-4, betas=(0.5, 0.999), eps=ADAM_EPS)
    for i in range(2):
        images = random_batch(seed=i)
        noise = torch.Generator().set_state(step.noise.get_state())
        zs = [torch.randn(16, 16, 1, 1, generator=noise) for _ in range(3)]
        step(images)
        reference_step(ref_G, ref_D, ref_opt_g, ref_opt_d, images.float() / 127.5 - 1, zs[0])
        for z in zs[1:]:
            ref_D.requires_grad_(False)
            ref_G.zero_grad()
            out = torch.sigmoid(ref_D(ref_G(z)))
            nn.BCELoss()(out, torch.ones_like(out)).backward()
            ref_opt_g.step()
            ref_D.requires_grad_(True)
    assert [s["step"].item() for s in step.opt_g.optimizer.state.values()][:1] == [6.0]  # 3 G updates a step
    assert [s["step"].item() for s in step.opt_d.optimizer.state.values()][:1] == [2.0]
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


STEP_MEANS = {"loss/D", "loss/G", "D(x)", "D(G(z))/before_D_step", "D(G(z))/after_D_step",
              "D/positive_logits_real", "D/positive_logits_fake"}


def test_stats_are_named_means_over_steps_and_reset():
    step, *_ = make_step()
    step(random_batch(seed=1))
    first = step.stats.take()
    step(random_batch(seed=2))
    second = step.stats.take()
    both_step, *_ = make_step()  # the same two steps, taken together
    both_step(random_batch(seed=1))
    both_step(random_batch(seed=2))
    both = both_step.stats.take()
    assert set(both) == STEP_MEANS | {"train/nonfinite_steps"}  # no fp16 scaler: no amp/skipped_steps
    for name in STEP_MEANS:
        torch.testing.assert_close(both[name], (first[name] + second[name]) / 2, msg=name)
        assert first[name] != second[name], name
    assert both["train/nonfinite_steps"] == first["train/nonfinite_steps"] == 0
    assert all(0.0 <= float(both[name]) <= 1.0 for name in STEP_MEANS - {"loss/D", "loss/G"})
    # D(x) is what it says: recomputed from D's logits on the first batch with plain torch
    check, *_ = make_step()
    real_logits = check(random_batch(seed=1)).real_logits
    torch.testing.assert_close(check.stats.take()["D(x)"], torch.sigmoid(real_logits).mean())
    assert all(float(v) == 0.0 or torch.isnan(v) for v in both_step.stats.take().values())  # reset by take()


def test_snapshot_and_restore_give_the_same_step_again():
    step, *_ = make_step()
    step(random_batch(seed=0))
    before = step.snapshot()
    live = {name: (t, t.data_ptr()) for name, t in step.state_tensors().items()}
    assert any(name.endswith("/adam.exp_avg_sq") for name in live) and "stats/sums" in live
    step(random_batch(seed=1))
    once = step.snapshot()
    step.restore(before)
    assert all(torch.equal(t, before[name]) for name, t in step.state_tensors().items())
    step(random_batch(seed=1))
    again = step.snapshot()
    assert once.keys() == again.keys() == before.keys()
    assert all(torch.equal(once[k], again[k]) for k in once)  # weights, moments, sums and the noise state
    assert not torch.equal(once["noise"], before["noise"])
    # restored in place: the tensors a CUDA graph writes into are still the ones the step reads
    assert all(t is step.state_tensors()[name] and t.data_ptr() == ptr for name, (t, ptr) in live.items())


def test_gradients_nonfinite_sees_one_bad_element_and_no_overflow():
    p, q = torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p, q])
    for bad, expected in ((float("nan"), 1.0), (float("inf"), 1.0), (-float("inf"), 1.0), (3e38, 0.0), (1.0, 0.0)):
        p.grad, q.grad = torch.full((1000,), 1e30), torch.ones(3)
        p.grad[517] = bad
        assert float(gradients_nonfinite(opt)) == expected, bad


def test_torch_private_skip_protocol():
    """`step_unless` plants `found_inf` / `grad_scale` on a fused optimizer, as torch.amp.GradScaler does.
    If this fails, torch changed that private protocol: step.py's skipped steps need a new way."""
    def fused_adam_with_gradient():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64))
        opt = torch.optim.Adam([p], lr=0.1, fused=True)
        p.grad = torch.randn(64)
        return p, opt

    p, opt = fused_adam_with_gradient()
    assert opt._step_supports_amp_scaling  # what GradScaler itself checks before planting the flags
    before = p.detach().clone()
    step_unless(opt, torch.ones(()))
    assert torch.equal(p, before) and float(opt.state[p]["step"]) == 0  # skipped: no update, no step counted
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    step_unless(opt, torch.zeros(()))
    reference, ref_opt = fused_adam_with_gradient()
    ref_opt.step()
    assert torch.equal(p, reference) and float(opt.state[p]["step"]) == 1  # not skipped: a plain step
