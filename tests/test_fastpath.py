"""The fast path's CPU-checkable parts: channels_last and the G-only backward give the plain path's gradients,
the step updates its state in place (what a CUDA graph replays into), which reason keeps the graph off, and
the graph's self-check (the comparison, and what the runner does with its verdict, with stand-in replays)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from dcgan_dist.config import LossConfig, PerfConfig, load_config
from dcgan_dist.fastpath import StepRunner, checked_replay, graph_blocker, prepare_models, snapshot_differences
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.step import GANStep, generator_loss

PRETEND_CUDA = torch.device("cuda")  # prepare_models only reads the device type; the models stay on the CPU


def build(channels_last: bool = False, ema_decay: float = 0.0):
    """A small GANStep on the CPU, its models optionally put in channels_last by `prepare_models`, with G's
    moving average when `ema_decay` > 0."""
    torch.manual_seed(0)
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    if channels_last:
        prepare_models(PerfConfig(), PRETEND_CUDA, G, D)
    acc = Accelerator(cpu=True)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    return GANStep(acc, G, D, opt_g, opt_d, LossConfig(), nz=16, seed=0, ema_decay=ema_decay, ema_rampup=0.5)


def batch(seed: int, channels_last: bool = False) -> torch.Tensor:
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def record_gradients(step: GANStep) -> dict[str, list[torch.Tensor]]:
    """Every gradient each parameter of G and D receives during the following steps, by name."""
    seen: dict[str, list[torch.Tensor]] = {}
    for prefix, model in (("G.", step.G), ("D.", step.D)):
        for name, p in model.named_parameters():
            p.register_hook(lambda g, key=prefix + name: seen.setdefault(key, []).append(g.detach().clone()))
    return seen


@pytest.fixture(autouse=True)
def one_thread_and_cudnn_flag_kept(monkeypatch):
    """One torch thread: these tiny models gain nothing from two, and spinning OpenMP threads on a busy
    2-core machine make each step many times slower. The cudnn flag prepare_models sets is restored."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_prepare_models_converts_in_place_and_autotunes_only_on_cuda():
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    before = [p for m in (G, D) for p in m.parameters()]
    prepare_models(PerfConfig(channels_last=False), torch.device("cpu"), G, D)
    assert all(p.is_contiguous() for p in before) and not torch.backends.cudnn.benchmark
    prepare_models(PerfConfig(), PRETEND_CUDA, G, D)
    after = [p for m in (G, D) for p in m.parameters()]
    assert all(a is b for a, b in zip(after, before))  # optimizers built earlier still hold these parameters
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in after if p.dim() == 4)
    assert torch.backends.cudnn.benchmark
    G2 = Generator(nz=16, ngf=8)
    prepare_models(PerfConfig(channels_last=False, cudnn_benchmark=False), PRETEND_CUDA, G2)
    assert all(p.is_contiguous() for p in G2.parameters()) and not torch.backends.cudnn.benchmark


def test_channels_last_step_gives_the_plain_steps_gradients():
    plain, fast = build(), build(channels_last=True)
    layouts = []
    fast.D_bare.main[0].register_forward_hook(
        lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    grads_plain, grads_fast = record_gradients(plain), record_gradients(fast)
    for seed in range(2):
        plain(batch(seed))
        fast(batch(seed, channels_last=True))
    assert layouts and all(layouts)  # the fast step really ran its convolutions in NHWC
    n_params = len([*plain.G.parameters(), *plain.D.parameters()])
    assert grads_plain.keys() == grads_fast.keys() and len(grads_fast) == n_params
    assert all(len(v) == 2 for v in grads_fast.values())  # one gradient per parameter per step
    for name, ours in grads_fast.items():
        for a, b in zip(ours, grads_plain[name]):  # another summation order: rounding level of the largest element
            torch.testing.assert_close(a.contiguous(), b, rtol=1e-4, atol=1e-5 * float(b.abs().max()),
                                       msg=f"{name}'s gradient differs")


def test_g_step_backward_into_g_only_gives_the_full_backwards_gradients():
    step = build()
    G_before = copy.deepcopy(step.accelerator.unwrap_model(step.G))
    noise = torch.Generator().set_state(step.noise.get_state())
    grads = record_gradients(step)
    step(batch(0))
    assert all(len(v) == 1 for v in grads.values())  # D's parameters: the D step's gradient only
    # the plain way: G before its update, D after its update, everything requiring grad, one full backward
    D_after = copy.deepcopy(step.D_bare)
    fake = G_before(torch.randn(8, 16, 1, 1, generator=noise))
    generator_loss(D_after(fake), "non_saturating").backward()
    assert all(p.grad is not None for p in D_after.parameters())  # the full backward did reach D's weights
    for name, p in G_before.named_parameters():
        torch.testing.assert_close(grads["G." + name][0], p.grad, rtol=1e-5, atol=1e-7, msg=f"G.{name}")


def test_step_updates_every_running_tensor_in_place():
    """A CUDA graph replays into the tensors it captured: the step must never rebind them (G's moving average
    included, which must also be part of the state a graph's self-check compares)."""
    step = build(ema_decay=0.99)
    step(batch(0))  # Adam's state and the statistic sums exist from the first step on
    names = step.state_tensors().keys()
    g_names = [n for n in names if n.startswith("G.") and "/adam." not in n]
    assert {n.replace("G.", "G_ema.", 1) for n in g_names} | {"ema/updates"} <= names

    def tensors() -> list[torch.Tensor]:
        opt_state = [t for opt in (step.opt_g, step.opt_d) for s in opt.optimizer.state.values() for t in s.values()]
        models = [t for m in (step.G, step.D, step.ema.model) for t in [*m.parameters(), *m.buffers()]]
        return [*step.state_tensors().values(), *opt_state, *models]

    before = [(t, t.data_ptr()) for t in tensors()]
    handle = step.D_bare.register_forward_hook(lambda m, i, out: out + float("inf"))
    step(batch(1))  # a non-finite step moves the streak counters
    handle.remove()
    assert [float(v) for v in step.nonfinite_flags(limit=1).values()] == [1.0, 1.0]
    step(batch(2))
    step.stats.take()
    after = tensors()
    assert len(after) == len(before)
    assert all(a is t and a.data_ptr() == ptr for a, (t, ptr) in zip(after, before))


def test_runner_on_cpu_is_the_eager_step_and_says_why_once():
    lines: list[str] = []
    runner_step, plain = build(channels_last=True), build(channels_last=True)  # as prepare_models leaves a CPU run
    runner = StepRunner(runner_step, load_config().perf, lines.append)
    for seed in range(3):
        out = runner(batch(seed), collect_grad_norms=seed == 2)  # the runner puts the batch in channels_last
        plain(batch(seed, channels_last=True))
    assert out.grad_norms_g["total"] > 0
    assert len(lines) == 1 and "eager steps (the device is cpu, and CUDA graphs need a CUDA GPU)" in lines[0]
    for a, b in zip([*runner_step.G.parameters(), *runner_step.D.parameters()], [*plain.G.parameters(),
                                                                                 *plain.D.parameters()]):
        assert torch.equal(a, b)
    ours, theirs = runner_step.stats.take(), plain.stats.take()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def stepped_snapshot():
    step = build(ema_decay=0.99)
    step(batch(0))
    step(batch(1))
    return step.snapshot()


def test_snapshot_differences_pass_identical_and_rounding_level_snapshots():
    snap = stepped_snapshot()
    same = {k: v.clone() for k, v in snap.items()}
    assert snapshot_differences(snap, same) == []
    # a few elements off by 2 x lr (a gradient at rounding level whose sign flipped): still the same step
    weight = "G.main.0.weight"
    flipped = {**same, weight: same[weight].clone()}
    flipped[weight].view(-1)[:3] += 4e-4
    assert snapshot_differences(snap, flipped) == []
    nan_alike = {k: v.clone() for k, v in snap.items()}
    snap["stats/sums"][0] = nan_alike["stats/sums"][0] = float("nan")
    assert snapshot_differences(snap, nan_alike) == []


@pytest.mark.parametrize("name, change, phrase", [
    ("D.main.0.weight", lambda t: t + 2e-4 * torch.randn_like(t), "relative difference"),  # a missed Adam update
    ("G.main.1.weight/adam.exp_avg", lambda t: t * 1.01, "relative difference"),
    ("D.main.3.running_var", lambda t: t.fill_(float("nan")), "NaN in different places"),
    ("D.main.3.num_batches_tracked", lambda t: t + 1, "not equal"),
    ("stats/sums", lambda t: t * 1.002, "relative difference"),
    ("G_ema.main.0.weight", lambda t: t * 1.01, "relative difference"),  # a missed moving-average update
    ("ema/updates", lambda t: t + 1, "relative difference"),
    ("noise", lambda t: torch.Generator().manual_seed(1).get_state(), "not equal"),
])
def test_snapshot_differences_name_what_differs(name, change, phrase):
    eager = stepped_snapshot()
    assert name in eager
    replayed = {**eager, name: change(eager[name].clone())}
    problems = snapshot_differences(eager, replayed)
    assert len(problems) == 1 and problems[0].startswith(f"{name} (") and phrase in problems[0], problems
    del replayed[name]
    assert snapshot_differences(eager, replayed) == [f"{name} (missing from the replayed step)"]


def test_checked_replay_leaves_the_state_of_exactly_one_step():
    step, plain = build(ema_decay=0.99), build(ema_decay=0.99)
    for seed in range(2):
        step(batch(seed))
        plain(batch(seed))
    replay = lambda: step(batch(2))  # an eager stand-in for the graph: the same step, so no difference
    out, problems = checked_replay(step, replay, batch(2))
    plain_out = plain(batch(2))
    assert problems == []
    assert torch.equal(out.real_logits, plain_out.real_logits)
    ours, theirs = step.snapshot(), plain.snapshot()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # not two steps


def runner_at_its_first_replay(replay) -> tuple[StepRunner, list[str]]:
    """A runner on the CPU as it stands right after a capture, its graph replaced by `replay`."""
    lines: list[str] = []
    step = build()
    step(batch(0))
    runner = StepRunner(step, PerfConfig(cuda_graph=False), lines.append)
    runner.graph_off, runner.graph, runner.static = None, SimpleNamespace(replay=replay), batch(1)
    return runner, lines


def one_step_after_the_first() -> dict[str, torch.Tensor]:
    plain = build()
    plain(batch(0))
    plain(batch(1))
    return plain.snapshot()


@pytest.mark.parametrize("kind", ["matches", "differs", "raises"])
def test_runner_self_check_keeps_the_graph_only_when_the_replay_matches(kind):
    def replay():
        if kind == "raises":
            runner.step.stats.take()  # half a step's worth of damage before it fails
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        runner.step(batch(1) if kind == "matches" else batch(2))  # "differs": another batch, as a stale input would

    runner, lines = runner_at_its_first_replay(replay)
    runner._checked_first_replay()
    expected, got = one_step_after_the_first(), runner.step.snapshot()
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # one eager step, whatever the verdict
    assert len(lines) == 2  # the runner's first line, then the verdict
    if kind == "matches":
        assert runner.graph_off is None and runner.checked and "self-check passed" in lines[1]
    else:
        assert runner.graph is None and runner.graph_off and lines[1].startswith(
            "[dcgan-train] fast path: WARNING: eager steps from here on: the CUDA graph's")
        assert ("differs from the eager step in D." in lines[1] if kind == "differs" else
                lines[1].endswith("self-check failed (RuntimeError: CUDA error: an illegal memory access was "
                                  "encountered)"))


def accelerator_like(device: str = "cuda", processes: int = 1, scaler: object = None) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device), num_processes=processes, scaler=scaler)


@pytest.mark.parametrize("perf, accelerator, reason", [
    (PerfConfig(), accelerator_like(), None),
    (PerfConfig(cuda_graph=False), accelerator_like(), "perf.cuda_graph is false"),
    (PerfConfig(cuda_graph=False), accelerator_like("cpu", 4), "perf.cuda_graph is false"),
    (PerfConfig(), accelerator_like("cpu"), "the device is cpu, and CUDA graphs need a CUDA GPU"),
    (PerfConfig(), accelerator_like(processes=8), "8 processes: DDP's all-reduce is not captured"),
    (PerfConfig(), accelerator_like(scaler=object()), "precision fp16: its loss scaler reads the scale on the host"),
])
def test_graph_blocker_names_the_first_reason(perf, accelerator, reason):
    got = graph_blocker(perf, accelerator)
    assert got == reason if reason is None else got.startswith(reason), got


def test_graph_blocker_without_generator_registration(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", type("CUDAGraphOfAnOlderTorch", (), {}))
    assert "cannot register the noise generator" in graph_blocker(PerfConfig(), accelerator_like())
