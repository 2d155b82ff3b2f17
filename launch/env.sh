#!/usr/bin/env bash
# Shared set-up for launch/quickstart.sh and launch/test.sh (source it): create .venv once and install
# bitnet-dist (editable) with its dev and hf extras (tests; export / generate / eval), then activate it.
# Idempotent: a later call only checks a stamp (pyproject hash + torch spec) and reinstalls when either
# changed.
#
#   BITNET_PYTHON      interpreter for the venv (default: python3)
#   BITNET_TORCH_SPEC  torch requirement installed first (default: torch==2.13.0 on machines without
#                      nvidia-smi, which takes the CPU build where PIP_FIND_LINKS offers it; on a GPU
#                      machine the default is "torch>=2.6", so pip keeps or fetches a CUDA build)
bitnet_env_fail() { echo "launch/env.sh: $*" >&2; return 1; }

# pip, without the machine's warnings about absent local index folders (PIP_FIND_LINKS entries).
bitnet_pip() {
  local out rc
  out=$(python -m pip "$@" 2>&1); rc=$?
  printf '%s\n' "$out" | grep -v "^WARNING: Location 'file:" | grep -v '^$' || true
  return $rc
}

# The install needs ~2.5 GiB (torch CPU, megatron-core, DeepSpeed, Triton): say so before pip fails
# half-way with "No space left on device". BITNET_MIN_FREE_GIB overrides the threshold (0 skips it).
bitnet_check_disk() {
  local need free_kib
  need="${BITNET_MIN_FREE_GIB:-3}"
  [ "$need" = 0 ] && return 0
  free_kib=$(df -Pk "$1" 2>/dev/null | awk 'NR==2 {print $4}')
  [ -n "$free_kib" ] || return 0
  if [ "$free_kib" -lt $((need * 1024 * 1024)) ]; then
    bitnet_env_fail "only $((free_kib / 1024)) MiB free under $1; installing .venv needs ~${need} GiB." \
      "Free disk space (old clones, pip caches), or set BITNET_MIN_FREE_GIB=0 to try anyway."
    return 1
  fi
}

bitnet_setup_env() {
  local root py want stamp
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  py="${BITNET_PYTHON:-python3}"
  if [ -z "${BITNET_TORCH_SPEC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then BITNET_TORCH_SPEC="torch>=2.6"; else BITNET_TORCH_SPEC="torch==2.13.0"; fi
  fi
  command -v "$py" >/dev/null 2>&1 || { bitnet_env_fail "$py not found: set BITNET_PYTHON to a Python >= 3.10"; return 1; }
  if [ ! -x "$root/.venv/bin/python" ]; then
    "$py" -m venv "$root/.venv" || { bitnet_env_fail "could not create $root/.venv"; return 1; }
  fi
  # shellcheck disable=SC1091
  . "$root/.venv/bin/activate" || return 1
  stamp="$root/.venv/.bitnet-installed"
  want="$(sha256sum "$root/pyproject.toml" | cut -c1-16) $BITNET_TORCH_SPEC"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    rm -f "$stamp"
    bitnet_check_disk "$root" || return 1
    bitnet_pip install -q "$BITNET_TORCH_SPEC" || { bitnet_env_fail "installing $BITNET_TORCH_SPEC failed"; return 1; }
    bitnet_pip install -q -e "$root[dev,hf,bench]" || { bitnet_env_fail "installing bitnet-dist failed"; return 1; }
    echo "$want" > "$stamp"
  fi
}

bitnet_setup_env || { return 1 2>/dev/null || exit 1; }
