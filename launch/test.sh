#!/usr/bin/env bash
# The README's test command: set up .venv (launch/env.sh) and run the whole test suite on CPU.
# Extra arguments go to pytest, e.g. ./launch/test.sh -k hadamard -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/launch/env.sh"
cd "$root"
export WANDB_MODE=disabled PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
