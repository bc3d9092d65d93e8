#!/usr/bin/env bash
# The main job on its embedded default: synthetic CelebA-format faces -> shards -> a CPU-sized run,
# then the run's report page. Extra arguments are config overrides, e.g.  bash launch/demo.sh train.max_steps=100
# The experiments side by side (healthy, mode collapse, vanishing gradients): bash launch/lab.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
run=runs/smoke
for arg in "$@"; do
  case "$arg" in run.dir=*) run="${arg#run.dir=}" ;; esac
done
dcgan-train --config configs/smoke.yaml "$@"
dcgan-report "$run" --out "$run/report.html"
echo "Report: $run/report.html   TensorBoard: tensorboard --logdir $run/tb   (checkpoints in $run/checkpoints)"
