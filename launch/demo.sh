#!/usr/bin/env bash
# The main job on its embedded default: synthetic CelebA-format faces -> shards -> a CPU-sized run.
# Extra arguments are config overrides, e.g.  bash launch/demo.sh train.max_steps=100
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
dcgan-train --config configs/smoke.yaml "$@"
echo "TensorBoard: tensorboard --logdir runs/smoke/tb   (samples under IMAGES; checkpoints in runs/smoke/checkpoints)"
