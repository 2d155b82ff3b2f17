#!/usr/bin/env bash
# Session 3 of 2026-11-24, one H100: `bash tools/gpu_round5.sh B` (kernel benchmark + megatron GPU tests) and
# `bash tools/gpu_round5.sh C` (end-to-end 1.3B / 400M throughput). Start each with the wheel install line.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
if [ "${1:-B}" = B ]; then
  timeout 170 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_megatron_gpu.py 2>&1 | tail -15 > $OUT/megatron_tests.txt
  cat $OUT/megatron_tests.txt
  timeout 400 python -m bitnet_dist.bench --out $OUT/bench 2>&1 | grep -E "^copy|wrote|error|Error" | tail -8
else
  timeout 260 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 2 --iters 5 \
    --profile $OUT/profiles_mbs2 --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260
  timeout 300 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260
fi
