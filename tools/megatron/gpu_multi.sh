#!/usr/bin/env bash
# Multi-GPU checks of the megatron engine (NCCL, fp32, one host with NGPU GPUs): each layout's loss curve against
# TP1 on the same data, and a checkpoint saved at a model-parallel layout continued at TP1 and at another layout.
# Usage (device machine, repo root, wheels on PYTHONPATH): bash tools/megatron/gpu_multi.sh [budget_s]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/mc
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BUDGET=${1:-400}; NGPU=$(nvidia-smi -L | wc -l)
t0=$(date +%s)
el() { echo "== $1 at +$(( $(date +%s) - t0 ))s"; }
T() { local want=$1; shift; local left=$(( BUDGET - ($(date +%s) - t0) )); (( left < 10 )) && { echo "skip: $*"; return; }
      timeout $(( want < left ? want : left )) "$@"; }
G=tools/megatron/gpu_check.py
C="curve --engine megatron --models small --dtype fp32 --kernels ${KERNELS:-torch} --steps 20 --seq 128 --mbs 2 --gbs 8 --lr 1e-3 --vocab 1024"
R="torchrun --standalone --nproc_per_node"
nvidia-smi -L
el tp1
T 60 python $G $C --out /tmp/mc/tp1.json | grep "^\[" 
el layouts
T 60 $R 2 $G $C --tp 2 --sp --save-at 10 --save-dir /tmp/mc/ck_tp2 --out /tmp/mc/tp2sp.json 2>&1 | grep -E "^\[|Error" | tail -2
T 60 $R 2 $G $C --pp 2 --vp 2 --save-at 10 --save-dir /tmp/mc/ck_pp2vp2 --out /tmp/mc/pp2vp2.json 2>&1 | grep -E "^\[|Error" | tail -2
T 60 $R 2 $G $C --out /tmp/mc/dp2.json 2>&1 | grep -E "^\[|Error" | tail -2
if (( NGPU >= 4 )); then
  T 80 $R 4 $G $C --tp 2 --pp 2 --vp 2 --sp --save-at 10 --save-dir /tmp/mc/ck_tp2pp2 --out /tmp/mc/tp2pp2vp2sp.json 2>&1 | grep -E "^\[|Error" | tail -2
fi
if (( NGPU >= 8 )); then
  T 80 $R 8 $G $C --tp 2 --pp 2 --vp 2 --sp --out /tmp/mc/tp2pp2vp2sp_dp2.json 2>&1 | grep -E "^\[|Error" | tail -2
fi
el reshard
T 60 python $G $C --load /tmp/mc/ck_tp2 --out /tmp/mc/tp2_to_tp1.json 2>&1 | grep -E "^\[|Error" | tail -2
T 60 $R 2 $G $C --pp 2 --vp 2 --load /tmp/mc/ck_tp2 --out /tmp/mc/tp2_to_pp2vp2.json 2>&1 | grep -E "^\[|Error" | tail -2
T 60 $R 2 $G $C --tp 2 --sp --load /tmp/mc/ck_pp2vp2 --out /tmp/mc/pp2vp2_to_tp2.json 2>&1 | grep -E "^\[|Error" | tail -2
[ -d /tmp/mc/ck_tp2pp2 ] && T 60 python $G $C --load /tmp/mc/ck_tp2pp2 --out /tmp/mc/tp2pp2_to_tp1.json 2>&1 | grep -E "^\[|Error" | tail -2
el compare
for f in /tmp/mc/*.json; do [ "$f" = /tmp/mc/tp1.json ] || python $G compare $f /tmp/mc/tp1.json --out $OUT/multi_compare.jsonl | tail -1; done
tar czf $OUT/multi_curves.tar.gz --exclude 'ck_*' -C /tmp mc
el done
