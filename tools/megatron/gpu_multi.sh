#!/usr/bin/env bash
# Multi-GPU checks of the megatron engine (NCCL, fp32, one host with NGPU GPUs): each layout's loss curve against
# TP1 on the same data, and a checkpoint saved at a model-parallel layout continued at TP1 and at another layout.
#
#   bash tools/megatron/gpu_multi.sh [budget_s]      (GPU host, repository root, bitnet-dist installed)
#
# Runs TP1, TP2+SP, PP2xVP2 and DP2 on 2 GPUs, TP2xPP2xVP2+SP on 4, the same with DP2 on 8, and the checkpoint
# reshards; prints each layout's first-loss difference and largest relative gap against TP1
# (gpu_check.py compare). budget_s (default 400) bounds the whole run. OUT (default ./out) receives
# multi_compare.jsonl and multi_curves.tar.gz; the curves and checkpoints go to $WORK (default $OUT/mc).
# KERNELS=auto runs the Triton path instead of the torch reference.
case "${1:-}" in -h|--help) sed -n '2,11p' "$0"; exit 0;; esac
set -u
OUT=${OUT:-$PWD/out}; WORK=${WORK:-$OUT/mc}; mkdir -p "$OUT" "$WORK"
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
T 60 python $G $C --out $WORK/tp1.json | grep "^\[" 
el layouts
T 60 $R 2 $G $C --tp 2 --sp --save-at 10 --save-dir $WORK/ck_tp2 --out $WORK/tp2sp.json 2>&1 | grep -E "^\[|Error" | tail -2
T 60 $R 2 $G $C --pp 2 --vp 2 --save-at 10 --save-dir $WORK/ck_pp2vp2 --out $WORK/pp2vp2.json 2>&1 | grep -E "^\[|Error" | tail -2
T 60 $R 2 $G $C --out $WORK/dp2.json 2>&1 | grep -E "^\[|Error" | tail -2
if (( NGPU >= 4 )); then
  T 80 $R 4 $G $C --tp 2 --pp 2 --vp 2 --sp --save-at 10 --save-dir $WORK/ck_tp2pp2 --out $WORK/tp2pp2vp2sp.json 2>&1 | grep -E "^\[|Error" | tail -2
fi
if (( NGPU >= 8 )); then
  T 80 $R 8 $G $C --tp 2 --pp 2 --vp 2 --sp --out $WORK/tp2pp2vp2sp_dp2.json 2>&1 | grep -E "^\[|Error" | tail -2
fi
el reshard
T 60 python $G $C --load $WORK/ck_tp2 --out $WORK/tp2_to_tp1.json 2>&1 | grep -E "^\[|Error" | tail -2
T 60 $R 2 $G $C --pp 2 --vp 2 --load $WORK/ck_tp2 --out $WORK/tp2_to_pp2vp2.json 2>&1 | grep -E "^\[|Error" | tail -2
T 60 $R 2 $G $C --tp 2 --sp --load $WORK/ck_pp2vp2 --out $WORK/pp2vp2_to_tp2.json 2>&1 | grep -E "^\[|Error" | tail -2
[ -d $WORK/ck_tp2pp2 ] && T 60 python $G $C --load $WORK/ck_tp2pp2 --out $WORK/tp2pp2_to_tp1.json 2>&1 | grep -E "^\[|Error" | tail -2
el compare
for f in $WORK/*.json; do [ "$f" = $WORK/tp1.json ] || python $G compare $f $WORK/tp1.json --out $OUT/multi_compare.jsonl | tail -1; done
tar czf $OUT/multi_curves.tar.gz --exclude 'ck_*' -C "$(dirname "$WORK")" "$(basename "$WORK")"
el done
