#!/usr/bin/env bash
# The lab's experiments side by side: the healthy baseline, mode collapse, vanishing gradients (the
# minimax loss) and its twin that differs only in the loss (non-saturating), on the same data with the
# same budget, then one page comparing them (docs/failure_modes.md says what to look for). The
# collapse run starts from the healthy run's checkpoint at half the budget (faces first, then their
# collapse), so the two are the same run until then.
#
#   bash launch/lab.sh                              # synthetic faces, CPU size (width 32, 600 steps each)
#   bash launch/lab.sh shards/celeba64 --size gpu   # real faces, full width, on a GPU
#   bash launch/lab.sh --size test                  # width 16, 150 steps: a quick look
#   bash launch/lab.sh -- run.seed=1                # key=value after -- applies to every run
#
# Runs go to runs/lab/<experiment> (started afresh each time), the page to runs/lab/compare.html.
# Uses the active environment when dcgan-train is on PATH, else creates .venv (launch/setup.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage="usage: bash launch/lab.sh [SHARDS] [--size cpu|test|gpu] [--out DIR] [-- key=value ...]"
shards="" size=cpu out=runs/lab
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="${2:?$usage}"; shift 2 ;;
    --out) out="${2:?$usage}"; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --) shift; break ;;
    -*) echo "lab.sh: unknown option $1; $usage" >&2; exit 2 ;;
    *) [ -z "$shards" ] || { echo "lab.sh: one SHARDS folder expected, got '$shards' and '$1'" >&2; exit 2; }
       shards="$1"; shift ;;
  esac
done
case "$size" in
  test) steps=150 sized=(model.ngf=16 model.ndf=16 diag.every=25 diag.warmup_steps=100 data.workers=0
                         log.images_every=25) ;;
  cpu) steps=600 sized=(log.images_every=50) ;;  # the presets' width and batch, one budget
  gpu) steps=3000 sized=(model.ngf=64 model.ndf=64 train.batch_size=128 precision=auto data.workers=8
                         log.images_every=250 diag.every=100 diag.warmup_steps=1000) ;;
  *) echo "lab.sh: --size: got '$size', expected cpu, test or gpu" >&2; exit 2 ;;
esac
if ! command -v dcgan-train >/dev/null; then
  . "$here/setup.sh"
fi
cd "$here/.."
if [ -n "$shards" ]; then
  [ -f "$shards/manifest.json" ] || { echo "lab.sh: $shards: no manifest.json, expected a folder from dcgan-shards build" >&2; exit 2; }
  data=(data.source="$shards")
else
  data=()  # the presets' data.source: synthetic
fi

for arg in "$@"; do  # a budget given after -- is the budget of every run
  case "$arg" in train.max_steps=*) steps="${arg#train.max_steps=}" ;; esac
done
half=$((steps / 2))
[ "$half" -ge 1 ] || { echo "lab.sh: train.max_steps: got $steps, expected at least 2" >&2; exit 2; }

experiments=(smoke mode_collapse vanishing_gradients vanishing_gradients_non_saturating)
labels=(healthy mode_collapse vanishing_minimax vanishing_non_saturating)
runs=()
for i in "${!experiments[@]}"; do
  run="$out/${labels[$i]}"
  case "${labels[$i]}" in
    healthy) own=(ckpt.every="$half" ckpt.keep=2) ;;  # keeps the checkpoint the collapse run starts from
    mode_collapse) own=(run.init_from="$out/healthy/checkpoints/$(printf 'step-%08d' "$half")") ;;
    *) own=() ;;
  esac
  echo "[lab] ${labels[$i]}: configs/${experiments[$i]}.yaml -> $run"
  dcgan-train --config "configs/${experiments[$i]}.yaml" run.dir="$run" run.fresh=true \
    ${data[@]+"${data[@]}"} ${sized[@]+"${sized[@]}"} "$@" train.max_steps="$steps" ${own[@]+"${own[@]}"}
  runs+=("$run")
done
dcgan-report --compare "${runs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --out "$out/compare.html"
echo "[lab] comparison page: $out/compare.html"
