#!/usr/bin/env bash
# Session 6 of 2026-11-24, one H100: the packed-register forward (bf16x2 / int8x4 PTX). Start with the wheel line.
#   lab: A/B of the warp-shuffle forward with the packing off/on (tools/kernels/hlab.py pk=0,1), INT8 and INT4-FP8
#   tests: the kernel GPU tests;  bench: the kernel benchmark (docs/benchmarks/kernels.{json,md})
#   e2e: end-to-end 1.3B at 2 x 2048 and 4 x 2048 tokens per micro-batch (bf16, v2_a8, v2_a4)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
for step in "$@"; do
case "$step" in
lab2)
  timeout 280 python tools/kernels/hlab.py --out $OUT/lab_pk2.jsonl --only fwd --dims 2048 4096 8192 16384 \
    --tokens 16384 --reps 20 --budget-s 260 --bits 8 4 --fwd "shfl=1 elems=2048,4096,8192,16384 warps=2,4,8,16 pk=5" ;;
lab3)
  timeout 60 python tools/kernels/hlab.py --out $OUT/lab_pk3.jsonl --only fwd --dims 2048 \
    --tokens 16384 --reps 20 --budget-s 50 --bits 8 4 --fwd "shfl=1 elems=2048 warps=1,2 pk=5"
  # the backward pk=0,1 A/B ran with packed unpacking in the backward kernel (no gain, since removed)
  timeout 150 python tools/kernels/hlab.py --out $OUT/lab_pk3.jsonl --only bwd --dims 2048 4096 8192 16384 \
    --tokens 16384 --reps 20 --budget-s 140 --bwd "shfl=1 elems=2048,4096 warps=4,8 sm=2 pk=0,1" ;;
lab4)
  timeout 150 python tools/kernels/hlab.py --out $OUT/lab_pk4.jsonl --only fwd --dims 2048 4096 8192 16384 \
    --tokens 16384 --reps 20 --budget-s 140 --bits 8 4 --fwd "shfl=1 elems=2048 warps=2,4,8 pk=1,5" ;;
lab7)
  for dw in "2048 1,2" "4096 2,4" "8192 4,8" "16384 8,16"; do set -- $dw
    timeout 100 python tools/kernels/hlab.py --out $OUT/lab_g2d.jsonl --only fwd --dims $1 --tokens 16384 --reps 20 \
      --budget-s 90 --bits 8 4 --fwd "shfl=1 elems=1024 warps=$2 pk=5"; done ;;
lab)
  # pk bit 2 (packed absmax) was measured here and then removed from the kernel: pk=3 / 7 now equal 1 / 5
  timeout 240 python tools/kernels/hlab.py --out $OUT/lab_pk.jsonl --only fwd --dims 2048 4096 8192 16384 \
    --tokens 16384 --reps 20 --budget-s 220 --bits 8 --fwd "shfl=1 elems=4096 warps=4 pk=0,1,3,5,7" ;;
tests)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -3 | tee $OUT/kernel_gpu_tests.txt ;;
mtests)
  timeout 120 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tail -3 | tee $OUT/megatron_gpu_tests.txt ;;
overhead)
  timeout 150 python tools/kernels/overhead.py --out $OUT/overhead.json > $OUT/overhead.txt 2>&1; head -22 $OUT/overhead.txt; grep -A40 "Self CPU %" $OUT/overhead.txt | cut -c1-160 ;;
bench)
  timeout 300 python -m bitnet_dist.bench --out $OUT/bench 2>&1 | grep -E "^copy|wrote|error|Error" | tail -8 ;;
e2e)
  timeout 250 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260
  timeout 280 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260 ;;
esac
done
