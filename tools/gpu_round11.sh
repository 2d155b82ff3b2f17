#!/usr/bin/env bash
# Session 7 of 2026-11-24, one H100: the software-pipelined persistent forward (STAGES). Start with the wheel line.
#   lab8: A/B of the forward: one block per program vs persistent pipelined programs (st=stages, sm=per SM)
#   tests: the kernel GPU tests;  bench: the kernel benchmark (docs/benchmarks/kernels.{json,md})
#   e2e: end-to-end 1.3B at 2 x 2048 and 4 x 2048 tokens per micro-batch (bf16, v2_a8, v2_a4)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
for step in "$@"; do
case "$step" in
lab8)  # ran at commit f4463b7 (the STAGES kernel option, since reverted)
  for T in 8192 16384; do for dw in "2048 2" "4096 2" "8192 4" "16384 8"; do set -- $dw
    timeout 60 python tools/kernels/hlab.py --out $OUT/lab_st.jsonl --only fwd --dims $1 --tokens $T --reps 20 \
      --budget-s 50 --bits 8 4 --fwd "shfl=1 elems=$1 warps=$2 pk=5" "shfl=1 elems=$1 warps=$2 st=2,3 sm=2,4,8,16"; done; done ;;
prof)
  timeout 200 python tools/kernels/layer_profile.py --out $OUT/prof --shapes 7B:qkv:16384 7B:fc1:16384 7B:qkv:8192 1.3B:wo:8192 1.3B:qkv:8192 2>&1 | grep -v Warn | tail -40 ;;
dy)
  timeout 150 python tools/kernels/dy_lab.py --out $OUT/dy_lab.jsonl 2>&1 | grep -v Warn | tail -60 ;;
lab9)
  for dw in "2048 4096 4,8" "4096 4096,8192 8,16" "8192 8192 4,8,16" "16384 16384 8,16,32"; do set -- $dw
    timeout 80 python tools/kernels/hlab.py --out $OUT/lab_bwd.jsonl --only bwd --dims $1 --tokens 16384 --reps 20 \
      --budget-s 70 --bwd "shfl=1 elems=$2 warps=$3 sm=1,2 gt=0,1"; done ;;
lab10)
  for T in 8192 16384; do
    timeout 60 python tools/kernels/hlab.py --out $OUT/lab_fwd16k.jsonl --only fwd --dims 16384 --tokens $T --reps 20 \
      --budget-s 50 --bits 8 4 --fwd "shfl=1 elems=16384 warps=8,16,32 pk=5"; done ;;
e2e8)
  timeout 280 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --fp8-backward --out $OUT/e2e_fp8.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260 ;;
tests)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -3 | tee $OUT/kernel_gpu_tests.txt ;;
mtests)
  timeout 120 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tail -40 | tee $OUT/megatron_gpu_tests.txt ;;
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
