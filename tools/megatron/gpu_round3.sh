#!/usr/bin/env bash
# Third one-GPU pass: resume diagnosis, fp32 TP over gloo (torch and Triton paths), 400M curves over 50 steps
# megatron vs DeepSpeed, and the 400M / 1.3B throughput table (bf16, v2_a8, v2_a4 in one process each).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/curves
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
BUDGET=${1:-560}
G="python tools/megatron/gpu_check.py"
t0=$(date +%s)
el() { echo "== $1 at +$(( $(date +%s) - t0 ))s"; }
T() { local want=$1; shift; local left=$(( BUDGET - ($(date +%s) - t0) )); (( left < 10 )) && { echo "skip: $*"; return; }
      timeout $(( want < left ? want : left )) "$@"; }
el resume
T 60 python tools/megatron/resume_diag.py 2>&1 | grep -E "^\[|Error" | tail -4
T 60 python -m pytest -q -p no:warnings -p no:logging tests/test_megatron_gpu.py -k resume 2>&1 | grep -v DEBUG | grep -E "assert|Error|passed|failed" | head -8
el tp
for k in torch auto; do for n in 1 2 4; do
  T 40 torchrun --standalone --nproc_per_node $n tools/megatron/gpu_check.py tp --models small --dtype fp32 --kernels $k \
    --seq 128 --mbs 2 --vocab 1024 --out $OUT/tp_fp32_$k.jsonl 2>&1 | grep -E "^\[|Error" | tail -2
done; done
el bench
T 110 $G bench --model 400M --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 --out $OUT/bench.jsonl 2>&1 | grep -E "^\[|Error" | tail -3
T 150 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 2 --iters 5 --out $OUT/bench.jsonl 2>&1 | grep -E "^\[|Error" | tail -3
el curves
C="--seq 256 --mbs 4 --gbs 8 --lr 1e-3 --vocab 1024 --steps 50"
for e in megatron deepspeed; do
  T 70 $G curve --engine $e --models 400M $C --out /tmp/curves/${e}_{model}.json 2>&1 | grep -E "^\[|Error" | tail -2
done
$G compare /tmp/curves/megatron_400M.json /tmp/curves/deepspeed_400M.json --out $OUT/compare.jsonl 2>&1 | tail -1
tar czf $OUT/curves400.tar.gz -C /tmp curves
el done
