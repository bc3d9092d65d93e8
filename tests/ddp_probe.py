"""Started by tests/test_ddp.py under torchrun: the trainer's pieces on every rank, recorded per rank.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/ddp_probe.py OUT_DIR STEPS SIGNAL_AT key=value...

Each rank writes OUT_DIR/rank{r}.json: the sample keys it was given, digests of G's and D's
parameters and buffers after every step, D's gradients and D's all-reduce calls during each step,
the step at which the ranks agreed to stop after rank 1 (only) sent itself SIGUSR1 at step
SIGNAL_AT, and the step statistics of all steps, this rank's own and as reduced over the ranks.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dcgan_dist.config import load_config
from dcgan_dist.data import make_batch_source
from dcgan_dist.parallel import build_accelerator
from dcgan_dist.preemption import StopRequest
from dcgan_dist.stats import reduce_by_name
from dcgan_dist.train import build_gan


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out, steps, signal_at, overrides = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    cfg = load_config(None, overrides)
    acc = build_accelerator(cfg)
    rank, world = acc.process_index, acc.num_processes
    source = make_batch_source(cfg.data, batch_size=cfg.train.batch_size, rank=rank, world_size=world,
                               seed=cfg.run.seed)
    gan_step = build_gan(cfg, acc)
    G, D = gan_step.G, gan_step.D

    d_allreduces = [0]

    def counting_hook(state, bucket):  # DDP's own default all-reduce, counted
        d_allreduces[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    D.register_comm_hook(None, counting_hook)
    record = {"rank": rank, "world": world, "pid": os.getpid(), "keys": [], "params": [], "buffers": [],
              "d_grads_none": [], "d_allreduces": [], "stopped_at": None}
    with StopRequest(acc, cfg.train.stop_check_every) as stop:
        step = 0
        for epoch in range(cfg.train.epochs):
            for batch in source.batches(epoch):
                before = d_allreduces[0]
                gan_step(batch.images)
                step += 1
                record["keys"].append(batch.keys)
                record["d_allreduces"].append(d_allreduces[0] - before)
                record["d_grads_none"].append(all(p.grad is None for p in D.parameters()))
                record["params"].append([digest(G.parameters()), digest(D.parameters())])
                record["buffers"].append([digest(G.buffers()), digest(D.buffers())])
                if step == signal_at and rank == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if record["stopped_at"] is None and stop.should_stop(step):
                    record["stopped_at"], record["stop_reason"] = step, stop.reason()
                if step == steps:
                    break
            if step == steps:
                break
    taken = gan_step.stats.take()
    record["stats_local"] = {name: float(v) for name, v in taken.items()}
    record["stats_reduced"] = reduce_by_name(acc, taken)
    # one plain backward through D: how many all-reduce calls a single D backward makes
    before = d_allreduces[0]
    real = gan_step.normalise(batch.images)
    acc.backward(D(real).float().mean())
    record["allreduces_per_d_backward"] = d_allreduces[0] - before
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    acc.end_training()


if __name__ == "__main__":
    main()
