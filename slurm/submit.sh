#!/usr/bin/env bash
# Submit a bitnet-dist training job: turns resource parameters into sbatch options for one of the two
# launch styles and passes Hydra overrides (after --) to python -m bitnet_dist.train.
#
#   slurm/submit.sh [--style tasks|torchrun] [--nodes N] [--gpus-per-node G] [--procs-per-node P]
#                   [--cpus-per-gpu C] [--time HH:MM:SS] [--partition P] [--account A]
#                   [--job-name NAME] [--dry-run] -- [hydra overrides...]
#
#   --style tasks     one Slurm task per GPU (srun); default
#   --style torchrun  one torchrun per node, c10d rendezvous on the first node
#   --gpus-per-node   GPUs (= ranks) per node; 0 = CPU job (gloo), ranks per node from --procs-per-node
#   --cpus-per-gpu    CPU cores per rank (default 8; CPU jobs: 1)
# Prints the job id. Logs: runs/slurm/<job-name>-<jobid>.out (appended across requeues).
#
# Example (4 nodes x 8 GPUs, the paper's 400M recipe on data made by bitnet-preprocess):
#   slurm/submit.sh --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu --account proj \
#       -- experiment=paper_400M 'data.paths=[data/mine]'
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
style=tasks nodes=1 gpus=0 procs=1 cpus="" time_limit=04:00:00 partition="" account="" name=bitnet dry=0
usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --style) style=$2; shift 2;;
    --nodes) nodes=$2; shift 2;;
    --gpus-per-node) gpus=$2; shift 2;;
    --procs-per-node) procs=$2; shift 2;;
    --cpus-per-gpu) cpus=$2; shift 2;;
    --time) time_limit=$2; shift 2;;
    --partition) partition=$2; shift 2;;
    --account) account=$2; shift 2;;
    --job-name) name=$2; shift 2;;
    --dry-run) dry=1; shift;;
    --) shift; break;;
    -h|--help) usage;;
    *) echo "submit.sh: unknown option $1 (Hydra overrides go after --)" >&2; usage;;
  esac
done
for v in nodes gpus procs; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "submit.sh: --${v} must be an integer, got '${!v}'" >&2; exit 2; }
done
[ "$nodes" -ge 1 ] || { echo "submit.sh: --nodes must be >= 1" >&2; exit 2; }
if [ "$gpus" -gt 0 ]; then ranks=$gpus; cpus=${cpus:-8}; else ranks=$procs; cpus=${cpus:-1}; fi
[ "$ranks" -ge 1 ] || { echo "submit.sh: --procs-per-node must be >= 1 for CPU jobs" >&2; exit 2; }
args=(--job-name="$name" --nodes="$nodes" --time="$time_limit" --output="$root/runs/slurm/%x-%j.out")
[ -n "$partition" ] && args+=(--partition="$partition")
[ -n "$account" ] && args+=(--account="$account")
[ "$gpus" -gt 0 ] && args+=(--gpus-per-node="$gpus")
case "$style" in
  tasks) args+=(--ntasks-per-node="$ranks" --cpus-per-task="$cpus"); script=train_tasks.sbatch;;
  torchrun) args+=(--ntasks-per-node=1 --cpus-per-task="$((cpus * ranks))"); script=train_torchrun.sbatch
            export BITNET_NPROC_PER_NODE="$ranks";;
  *) echo "submit.sh: --style must be tasks or torchrun, got '$style'" >&2; exit 2;;
esac
mkdir -p "$root/runs/slurm"
export BITNET_ROOT="$root"
if [ "$dry" = 1 ]; then
  echo sbatch "${args[@]}" "$root/slurm/$script" "$@"
  exit 0
fi
sbatch --parsable "${args[@]}" "$root/slurm/$script" "$@"
