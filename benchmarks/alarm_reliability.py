"""How reliably the failure alarms fire: the healthy run and both failure presets over several seeds
(the alarm table in docs/failure_modes.md).

    python benchmarks/alarm_reliability.py                                  # synthetic faces, test size, 5 seeds
    python benchmarks/alarm_reliability.py --data shards/celeba-half-10k --size cpu

Each run is a real `dcgan-train` (configs/smoke.yaml for the healthy run, configs/mode_collapse.yaml
and configs/vanishing_gradients.yaml for the failures) with `run.seed` varied and nothing else; the
collapse run starts from the same seed's healthy run at half the budget, as launch/lab.sh runs it.
The alarms are read back from each run's diagnostics.json. Prints a Markdown table: per run and
seed, the step each alarm first fired (or "none") and the metrics at that check, then the
counts (collapse flagged n/N, vanishing n/N, healthy false alarms n/N).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {"healthy": "configs/smoke.yaml", "mode_collapse": "configs/mode_collapse.yaml",
           "vanishing_gradients": "configs/vanishing_gradients.yaml"}
SIZES = {  # (steps, overrides shared by every run of a size)
    "test": (150, ["model.ngf=16", "model.ndf=16", "diag.every=25", "diag.warmup_steps=100"]),
    "cpu": (300, ["diag.every=25"]),
}


def first_alarms(run: Path) -> dict[str, dict]:
    """Each alarm's first firing in a finished run: {name: {"step": ..., "metrics": {...}}}."""
    fired: dict[str, dict] = {}
    for event in json.loads((run / "diagnostics.json").read_text())["alarms"]:
        fired.setdefault(event["alarm"], event)
    return fired


def describe(event: dict | None) -> str:
    if event is None:
        return "none"
    m = event["metrics"]
    if event["alarm"] == "vanishing_gradients":
        shown = f"G's norm {m['grad/G/total']:.1e} from {m['grad/G/early']:.1e}, D(G(z)) {m['D(G(z))']:.1e}"
    else:
        shown = f"diversity ratio {m['diversity/ratio']:.3f}, D(G(z)) {m['D(G(z))']:.2f}"
        if "coverage/modes" in m:
            shown += f", modes covered {m['coverage/modes']}"
    return f"step {event['step']} ({shown})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", help="data.source of every run (default %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZES), default="test", help="run size (default %(default)s)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/alarm_reliability"), help="run folders go here")
    parser.add_argument("--threads", type=int, default=0, help="perf.cpu_threads of each run (0: auto)")
    parser.add_argument("override", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()

    steps, sized = SIZES[args.size]
    rows, flagged = [], {name: 0 for name in PRESETS}
    for name, preset in PRESETS.items():
        for seed in range(args.seeds):
            run = args.out / f"{name}-seed{seed}"
            own = {"healthy": [f"ckpt.every={steps // 2}", "ckpt.keep=2"],
                   "mode_collapse": [f"run.init_from={args.out / f'healthy-seed{seed}'}/checkpoints/"
                                     f"step-{steps // 2:08d}"]}.get(name, [])
            command = ["dcgan-train", "--config", preset, f"data.source={args.data}", f"run.seed={seed}",
                       f"run.dir={run}", "run.fresh=true", "ckpt.every=100000", "log.images_every=100000",
                       f"train.max_steps={steps}", *sized, *args.override, *own]
            if args.threads:
                command.append(f"perf.cpu_threads={args.threads}")
            start = time.monotonic()
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"})  # tqdm reads it: no bars
            if done.returncode != 0:
                print(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            fired = first_alarms(run)
            flagged[name] += (name in fired) if name != "healthy" else not fired  # each preset names its alarm
            rows.append((name, seed, describe(fired.get("vanishing_gradients")), describe(fired.get("mode_collapse")),
                         time.monotonic() - start))
            print(f"[alarm_reliability] {name} seed {seed}: {sorted(fired) or 'no alarm'} "
                  f"({rows[-1][-1]:.0f} s)", file=sys.stderr, flush=True)

    print(f"\ndata.source={args.data}, size {args.size}: train.max_steps={steps} {' '.join(sized + args.override)}\n")
    print("| run | seed | `vanishing_gradients` | `mode_collapse` | wall s |")
    print("|---|---|---|---|---|")
    for name, seed, vanishing, collapse, wall in rows:
        print(f"| {name} | {seed} | {vanishing} | {collapse} | {wall:.0f} |")
    n = args.seeds
    print(f"\ncollapse flagged {flagged['mode_collapse']}/{n}, vanishing flagged {flagged['vanishing_gradients']}/{n}, "
          f"healthy without any alarm {flagged['healthy']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
