#!/usr/bin/env bash
# Shared set-up for launch/quickstart.sh and launch/test.sh: create .venv once and install
# bitnet-dist (editable) with its dev extra. Idempotent: a second call only checks the install.
#
#   BITNET_PYTHON      interpreter for the venv (default: python3)
#   BITNET_TORCH_SPEC  torch requirement installed first (default: torch==2.13.0 on machines without
#                      nvidia-smi, which takes the CPU build where PIP_FIND_LINKS offers it; on a GPU
#                      machine the default is unpinned "torch>=2.6" so pip keeps a CUDA torch you have)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${BITNET_PYTHON:-python3}"
if [ -z "${BITNET_TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then BITNET_TORCH_SPEC="torch>=2.6"; else BITNET_TORCH_SPEC="torch==2.13.0"; fi
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.bitnet-installed
want="$(sha256sum pyproject.toml | cut -c1-16) $BITNET_TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -m pip install -q "$BITNET_TORCH_SPEC"
  python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
