# Sourced by the sbatch scripts in slurm/: repository root, Python environment, NCCL settings.
# Not a job script by itself.
#
#   BITNET_ROOT      repository checkout used by the job (default: the directory sbatch was called from)
#   BITNET_VENV      virtual environment to activate (default: $BITNET_ROOT/.venv when it exists)
#   BITNET_TRAIN_CMD command that replaces "python -m bitnet_dist.train" (a profiler wrapper, a stand-in)

BITNET_ROOT="${BITNET_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$BITNET_ROOT" || { echo "bitnet-slurm: BITNET_ROOT=$BITNET_ROOT does not exist" >&2; exit 2; }
venv="${BITNET_VENV:-$BITNET_ROOT/.venv}"
if [ -f "$venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
read -r -a BITNET_TRAIN <<< "${BITNET_TRAIN_CMD:-python -m bitnet_dist.train}"

# NVLink SHARP / multicast must stay off on our GPU hosts; the rest makes failures loud and early.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

echo "bitnet-slurm: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST} at $(date -u +%FT%TZ)"

# Wait for the job step in $1 and return its exit status, also when a trapped signal interrupted
# `wait` (bash returns 128+signal from an interrupted wait while the step keeps running).
bitnet_wait_step() {
  local pid=$1 rc=0
  wait "$pid"; rc=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
  return "$rc"
}
