#!/usr/bin/env bash
# Session 4 of 2026-11-24, one H100, FastLaunch on by default. Start each with the wheel install line.
#   A: megatron GPU tests (resume tolerance from measured spread), resume_diag.py (with the run-to-run spread),
#      the Hadamard product precision sweep (bf16x3 vs TF32x3)
#   B: the kernel benchmark (docs/benchmarks/kernels.{json,md})
#   C: end-to-end 1.3B at 2 x 2048 and 4 x 2048 per micro-batch; 1.3B v2_a4 at 8 x 2048 alone
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
case "${1:-A}" in
A)
  timeout 200 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_megatron_gpu.py --tb=line 2>&1 \
    | grep -E "^/|passed|failed" | cut -c1-600 | tee $OUT/megatron_tests.txt
  timeout 200 python tools/megatron/resume_diag.py 2>&1 | grep -E "^\[(resume|repeat)\]" | tee $OUT/resume_diag.txt
  timeout 180 python tools/kernels/sweep.py --only prec --out $OUT/sweep_prec.jsonl 2>&1 | grep -E "^copy|^prec|Error" ;;
B)
  timeout 450 python -m bitnet_dist.bench --out $OUT/bench 2>&1 | grep -E "^copy|wrote|error|Error" | tail -8 ;;
C)
  timeout 220 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260
  timeout 220 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260
  timeout 140 $G bench --model 1.3B --precision v2_a4 --seq 2048 --mbs 8 --gbs 32 --vocab 32000 --warmup 2 --iters 4 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260 ;;
esac
