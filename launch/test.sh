#!/usr/bin/env bash
# The test suite on a fresh machine. Extra arguments go to pytest, e.g.  bash launch/test.sh -k resume
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest "$@"
