#!/usr/bin/env bash
# Second GPU pass (after fixing the optimizer checkpoint format and the synthetic data seeding):
# engine tests, first loss / curves megatron vs deepspeed on identical data, TP over gloo, 1.3B + v2_a4 bench.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/curves
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
BUDGET=${1:-300}
G="python tools/megatron/gpu_check.py"
t0=$(date +%s)
el() { echo "== $1 at +$(( $(date +%s) - t0 ))s"; }
T() { local want=$1; shift; local left=$(( BUDGET - ($(date +%s) - t0) )); (( left < 10 )) && { echo "skip: $*"; return; }
      timeout $(( want < left ? want : left )) "$@"; }
el pytest
T 90 python -m pytest -q -p no:warnings tests/test_megatron_gpu.py 2>&1 | tail -6
el tp
for n in 1 2 4; do
  T 40 torchrun --standalone --nproc_per_node $n tools/megatron/gpu_check.py tp --models small \
    --seq 128 --mbs 2 --vocab 1024 --out $OUT/tp.jsonl 2>&1 | grep -E "^\[|Error" | tail -3
done
el curves
C="--seq 256 --mbs 4 --gbs 8 --lr 1e-3 --vocab 1024"
for e in megatron deepspeed; do
  T 50 $G curve --engine $e --models tiny small $C --steps 50 --out /tmp/curves/${e}_{model}.json 2>&1 | grep -E "^\[|Error" | tail -3
  T 35 $G curve --engine $e --models 400M $C --steps 5 --out /tmp/curves/${e}_{model}.json 2>&1 | grep -E "^\[|Error" | tail -2
done
for m in tiny small 400M; do $G compare /tmp/curves/megatron_$m.json /tmp/curves/deepspeed_$m.json --out $OUT/compare.jsonl 2>&1 | tail -1; done
tar czf $OUT/curves.tar.gz -C /tmp curves
el bench
T 40 $G bench --model 400M --precision v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 1 --iters 4 --out $OUT/bench.jsonl 2>&1 | grep -E "^\[|Error" | tail -2
T 120 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 1 --iters 3 --out $OUT/bench.jsonl 2>&1 | grep -E "^\[|Error" | tail -4
el done
