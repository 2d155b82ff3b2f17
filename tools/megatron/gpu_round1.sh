#!/usr/bin/env bash
# All megatron-engine checks on one GPU in one call (device time is scarce): engine tests, loss curves
# megatron vs deepspeed vs a plain reference, TP over gloo at the model level, throughput.
# Usage (device machine, repo root, wheels on PYTHONPATH): bash tools/megatron/gpu_round1.sh [budget_s]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/curves
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
BUDGET=${1:-575}
G="python tools/megatron/gpu_check.py"
t0=$(date +%s)
el() { echo "== $1 at +$(( $(date +%s) - t0 ))s"; }
# timeout of min(planned, what is left of the budget)
T() { local want=$1; shift; local left=$(( BUDGET - ($(date +%s) - t0) )); (( left < 10 )) && { echo "skip: $*"; return; }
      timeout $(( want < left ? want : left )) "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
el pytest
T 120 python -m pytest -q -p no:warnings tests/test_megatron_gpu.py 2>&1 | tail -15
el curves
C="--steps 50 --seq 256 --mbs 4 --gbs 8 --lr 1e-3 --vocab 1024"
T 100 $G curve --engine megatron  --models tiny small 400M $C --out /tmp/curves/megatron_{model}.json 2>&1 | grep -E "^\[|Error|error" | tail -6
T 100 $G curve --engine deepspeed --models tiny small 400M $C --out /tmp/curves/deepspeed_{model}.json 2>&1 | grep -E "^\[|Error|error" | tail -6
for m in tiny small 400M; do $G compare /tmp/curves/megatron_$m.json /tmp/curves/deepspeed_$m.json --out $OUT/compare.jsonl 2>&1 | tail -1; done
tar czf $OUT/curves.tar.gz -C /tmp curves
el tp
for n in 1 2 4; do
  T 60 torchrun --standalone --nproc_per_node $n tools/megatron/gpu_check.py tp --models small 400M --layers 4 \
    --seq 128 --mbs 2 --vocab 1024 --out $OUT/tp.jsonl 2>&1 | grep -E "^\[|Error" | tail -3
done
el bench
T 100 $G bench --model 400M --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 1 --iters 4 --out $OUT/bench.jsonl 2>&1 | grep -E "^\[|Error" | tail -4
T 130 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 1 --iters 4 --out $OUT/bench.jsonl 2>&1 | grep -E "^\[|Error" | tail -4
el done
