#!/usr/bin/env bash
# Session 5 of 2026-11-24, one H100: the warp-shuffle forward kernel. Start each with the wheel install line.
#   A: the kernel benchmark (docs/benchmarks/kernels.{json,md}) and the kernel GPU tests
#   B: end-to-end 1.3B at 2 x 2048 and 4 x 2048 tokens per micro-batch (bf16, v2_a8, v2_a4)
# The Hadamard-variant sweeps of this round: python tools/kernels/hlab.py (raw/round9_2026-11-24/lab*.jsonl).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
case "${1:-A}" in
A)
  timeout 300 python -m bitnet_dist.bench --out $OUT/bench 2>&1 | grep -E "^copy|wrote|error|Error" | tail -8
  timeout 280 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -3 | tee $OUT/kernel_gpu_tests.txt ;;
B)
  timeout 250 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260
  timeout 280 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260 ;;
esac
