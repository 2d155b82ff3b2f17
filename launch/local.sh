#!/usr/bin/env bash
# Train on this machine with torchrun: one rank per GPU (or N ranks on CPU, gloo), Hydra overrides
# passed through. The run directory follows from the overrides (conf/train.yaml: run_dir), so running
# the same command again resumes from the latest checkpoint.
#
#   launch/local.sh [--nproc N] [hydra overrides...]
#   launch/local.sh --nproc 2 experiment=smoke engine=deepspeed
#
#   --nproc N   ranks (default: number of visible GPUs, 1 on a machine without GPUs)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nproc=""
if [ "${1:-}" = "--nproc" ]; then nproc=${2:?--nproc needs a number}; shift 2
elif [[ "${1:-}" == --nproc=* ]]; then nproc=${1#--nproc=}; shift; fi
if [ -f "$root/.venv/bin/activate" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  # shellcheck disable=SC1091
  . "$root/.venv/bin/activate"
fi
if [ -z "$nproc" ]; then
  nproc=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: --nproc must be a positive integer, got '$nproc'" >&2; exit 2; }
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}" PYTHONFAULTHANDLER=1
# torchrun would set 1 anyway (and warn); ranks x threads above the core count slows CPU runs down.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$root"
# --standalone: c10d rendezvous on a free localhost port, so two local runs never collide.
exec torchrun --standalone --nnodes=1 --nproc_per_node="$nproc" \
  -m bitnet_dist.train "$@"
