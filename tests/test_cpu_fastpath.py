"""The CPU fast path: `precision: auto` is bf16 exactly where bf16 pays on the CPU (AMX-BF16; decided from
injected probe answers both ways, and on this machine against /proc/cpuinfo), CPU runs train in channels_last
in fp32 and bf16, channels_last gives the plain layout's gradients on a CPU, and the trainer prints and uses
its choice of torch threads and loader workers."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator

import dcgan_dist.parallel
import dcgan_dist.train
from dcgan_dist.config import LossConfig, PerfConfig, load_config
from dcgan_dist.cpu import CpuBf16, bf16_pays, plan_cpu, probe_cpu_bf16, usable_cores
from dcgan_dist.fastpath import fast_memory_format, prepare_models
from dcgan_dist.models import Discriminator, Generator
from dcgan_dist.parallel import build_accelerator, resolve_precision
from dcgan_dist.step import GANStep

REPO = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def threads_kept():
    """The trainer sets torch's thread count for the process; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def on_cpu(monkeypatch):
    """Runs as on a machine without a GPU, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------------------------------ bf16 detection

@pytest.mark.parametrize("flags, onednn, pays, named", [
    ({"amx_bf16": True, "avx512_bf16": True}, True, True, "AMX-BF16"),  # Sapphire Rapids and later
    ({"avx512_bf16": True}, True, False, "measured slower"),  # Cooper Lake, AMD Zen 4, a VM hiding AMX
    ({"avx512_f": True}, True, False, "emulated"),  # AVX512 without BF16: oneDNN accepts it, it emulates
    ({}, False, False, "emulated"),  # AVX2 only, like a Zen 3 or most laptops
    ({"amx_bf16": True}, False, False, "oneDNN"),  # the instructions, but a torch without bf16 kernels
])
def test_bf16_pays_needs_amx_and_onednn(flags, onednn, pays, named):
    answer = bf16_pays({**AVX2_ONLY, **flags}, onednn)
    assert answer.pays is pays and named in answer.why


def test_bf16_pays_trusts_only_x86():
    answer = bf16_pays({"architecture": "arm64", "bf16": True, "sve_bf16": True}, onednn_bf16=True)
    assert not answer.pays and "arm64" in answer.why


def test_probe_on_this_machine_agrees_with_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo (not Linux)")
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split())
    assert probe_cpu_bf16().pays == ("amx_bf16" in flags and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_auto_precision_on_a_cpu_follows_the_probe_both_ways(on_cpu):
    assert resolve_precision("auto", CpuBf16(True, "AMX")) == "bf16"
    assert resolve_precision("auto", CpuBf16(False, "AVX2 only")) == "no"
    assert resolve_precision("no", CpuBf16(True, "AMX")) == "no"  # an explicit choice stays


@pytest.mark.parametrize("native", [True, False])
def test_build_accelerator_resolves_auto_from_the_probe_and_says_why(on_cpu, monkeypatch, capsys, native):
    why = "the CPU computes bf16 natively (AMX-BF16)" if native else "no AMX-BF16 or AVX512-BF16"
    monkeypatch.setattr(dcgan_dist.parallel, "probe_cpu_bf16", lambda: CpuBf16(native, why))
    cfg = load_config(None, [])
    acc = build_accelerator(cfg)
    expected = "bf16" if native else "no"
    assert (cfg.precision, acc.mixed_precision) == (expected, expected)
    assert f"[dcgan-train] precision auto: {'bf16' if native else 'fp32'} on this CPU ({why})" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ channels_last

def test_channels_last_on_a_cpu_only_when_asked():
    assert fast_memory_format(PerfConfig(), CPU) == torch.channels_last
    assert fast_memory_format(PerfConfig(channels_last=False), CPU) == torch.contiguous_format
    assert fast_memory_format(PerfConfig(), torch.device("mps")) == torch.contiguous_format  # unmeasured there
    G = Generator(nz=16, ngf=8)
    prepare_models(PerfConfig(), CPU, G)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in G.parameters() if p.dim() == 4)
    G_plain = Generator(nz=16, ngf=8)
    prepare_models(PerfConfig(channels_last=False), CPU, G_plain)
    assert all(p.is_contiguous() for p in G_plain.parameters())


def small_step(precision: str, channels_last: bool) -> GANStep:
    torch.manual_seed(0)
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    prepare_models(PerfConfig(channels_last=channels_last), CPU, G, D)
    acc = Accelerator(cpu=True, mixed_precision=precision)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    return GANStep(acc, G, D, opt_g, opt_d, LossConfig(), nz=16, seed=0)


def test_channels_last_on_a_cpu_gives_the_plain_layouts_gradients():
    """One step, models put in channels_last by the CPU rule (prepare_models) against plain ones, in fp32:
    the same gradients to the rounding of another summation order."""
    torch.set_num_threads(1)
    grads = {}
    for channels_last in (False, True):
        step = small_step("no", False)
        if channels_last:
            prepare_models(PerfConfig(), CPU, step.G, step.D)
        layouts = []
        step.D_bare.main[0].register_forward_hook(
            lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
        seen = grads[channels_last] = {}
        for prefix, model in (("G.", step.G), ("D.", step.D)):
            for name, p in model.named_parameters():
                p.register_hook(lambda g, key=prefix + name: seen.setdefault(key, g.detach().contiguous()))
        images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        step(images.contiguous(memory_format=torch.channels_last) if channels_last else images)
        assert layouts and all(layouts) == channels_last  # the layout really differed between the two steps
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 24  # every parameter of G and D
    for name, plain in grads[False].items():
        torch.testing.assert_close(grads[True][name], plain, rtol=1e-4, atol=1e-5 * float(plain.abs().max()),
                                   msg=f"{name}'s gradient differs")


def test_channels_last_bf16_convolutions_on_a_cpu_give_the_plain_layouts_outputs():
    """In bf16 a whole step's gradients differ between layouts as much as bf16's from fp32 (10-30% at this width:
    rounding compounds through ten layers), so bf16 is compared layer by layer: each convolution's bf16 output in
    channels_last matches the plain layout's to bf16's rounding, for the same input."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    plain = [m for net in (G, D) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    G_cl, D_cl = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    G_cl.load_state_dict(G.state_dict()), D_cl.load_state_dict(D.state_dict())
    prepare_models(PerfConfig(), CPU, G_cl, D_cl)
    fast = [m for net in (G_cl, D_cl) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(plain) == len(fast) == 10
    for i, (a, b) in enumerate(zip(plain, fast)):
        x = torch.randn(4, a.in_channels, 8, 8)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = a(x), b(x.contiguous(memory_format=torch.channels_last))
        assert want.dtype == got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        diff = (got.float() - want.float()).norm() / want.float().norm()
        assert float(diff) <= 1e-2, f"convolution {i}: relative difference {float(diff):.1e}"


# ------------------------------------------------------------------------------------------ threads and workers

def test_plan_gives_compute_every_core_and_caps_workers_at_the_cores():
    laptop = plan_cpu(cores=2, local_processes=1, workers=1, threads="auto", default_threads=2)
    assert (laptop.threads, laptop.workers) == (2, 1) and "capped" not in laptop.why
    for cores in (4, 8):  # torch's default is the physical cores; a worker takes none of them away
        assert (plan_cpu(cores=cores, local_processes=1, workers=2, threads="auto", default_threads=cores).threads
                == cores)
    capped = plan_cpu(cores=2, local_processes=1, workers=4, threads="auto", default_threads=2)
    assert capped.workers == 2 and "data.workers 4 capped at 2" in capped.why
    shared = plan_cpu(cores=8, local_processes=2, workers=8, threads="auto", default_threads=8)
    assert (shared.threads, shared.workers) == (4, 4)  # two processes on one machine split its cores
    assert plan_cpu(cores=8, local_processes=1, workers=1, threads="auto", default_threads=1).threads == 1  # OMP_NUM_THREADS=1
    assert plan_cpu(cores=2, local_processes=1, workers=0, threads=3, default_threads=2).threads == 3  # as configured


def test_presets_never_ask_a_two_core_laptop_for_more_workers_than_cores():
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        workers = load_config(preset).data.workers
        assert plan_cpu(cores=2, local_processes=1, workers=workers, threads="auto", default_threads=2).workers <= 2
        if preset.name == "smoke.yaml":  # the demo's own choice needs no cap
            assert workers <= 2, preset


def test_the_trainer_prints_and_uses_its_thread_and_worker_choice(tmp_path, image_folder, monkeypatch, capsys):
    """Asked for more workers than this machine has cores: capped, said in the CPU line, no DataLoader warning,
    and the steps run with the chosen number of torch threads."""
    threads_in_steps, loader_workers = [], []
    original_call, original_loader = GANStep.__call__, torch.utils.data.DataLoader.__init__

    def recording_call(self, *args, **kwargs):
        threads_in_steps.append(torch.get_num_threads())
        return original_call(self, *args, **kwargs)

    def recording_loader(self, *args, **kwargs):
        original_loader(self, *args, **kwargs)
        loader_workers.append(self.num_workers)

    monkeypatch.setattr(GANStep, "__call__", recording_call)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", recording_loader)
    cores = usable_cores()
    asked_threads = 2 if torch.get_num_threads() == 1 else 1  # another count than the process had
    overrides = [f"data.source={image_folder}", f"run.dir={tmp_path}", "model.ngf=8", "model.ndf=8", "model.nz=16",
                 "train.batch_size=8", "train.max_steps=2", f"data.workers={cores + 1}",
                 f"perf.cpu_threads={asked_threads}", "diag.enabled=false", "precision=no"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dcgan_dist.train.main(overrides) == 0
    out = capsys.readouterr().out
    assert (f"[dcgan-train] CPU: {asked_threads} torch threads, {cores} loader workers "
            f"(data.workers {cores + 1} capped at {cores}, this process's cores; perf.cpu_threads)") in out
    assert loader_workers and set(loader_workers) == {cores}  # every DataLoader the run built
    assert threads_in_steps == [asked_threads, asked_threads]
    assert not [w for w in caught if "worker processes" in str(w.message)]  # the DataLoader's oversubscription warning
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["workers"] == cores  # what ran


def test_a_bf16_cpu_run_trains_in_channels_last(tmp_path, image_folder, monkeypatch, on_cpu):
    """`precision: auto` on a CPU where the probe says bf16 pays (injected: on this one it may not, and then
    bf16 is slow, so the run is tiny): bf16, channels_last, finite losses, G's weights move."""
    monkeypatch.setattr(dcgan_dist.parallel, "probe_cpu_bf16", lambda: CpuBf16(True, "injected"))
    steps = []
    original_build = dcgan_dist.train.build_gan
    monkeypatch.setattr(dcgan_dist.train, "build_gan", lambda *a, **k: steps.append(original_build(*a, **k)) or steps[-1])
    torch.set_num_threads(1)
    cfg = load_config(None, [f"data.source={image_folder}", f"run.dir={tmp_path}", "model.ngf=8", "model.ndf=8",
                             "model.nz=16", "train.batch_size=8", "train.max_steps=2", "log.every=1",
                             "data.workers=0", "diag.enabled=false"])
    last = dcgan_dist.train.train(cfg)
    assert cfg.precision == "bf16" and steps[0].accelerator.mixed_precision == "bf16"
    assert {"loss/D", "loss/G", "D(x)"} <= last.keys() and all(torch.isfinite(torch.tensor(v)) for v in last.values())
    G = steps[0].accelerator.unwrap_model(steps[0].G)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in G.parameters() if p.dim() == 4)
    torch.manual_seed(cfg.run.seed)
    initial = Generator(16, 8)  # build_gan's first draw from the seeded global RNG
    moved = [float((p.detach() - q.detach()).abs().max()) for p, q in zip(G.parameters(), initial.parameters())]
    assert all(m > 0 for m in moved) and max(moved) < 1e-3  # two Adam steps at lr 2e-4: at most ~4e-4
