#!/usr/bin/env bash
# Session 9 of 2026-11-25, one H100: statistics probes as a forward pass of their own (train.py).
# Start with the wheel line.
#   mtests: megatron GPU tests;  app: tools/megatron/graph_app_check.sh (eager / graph / resumed / unprobed)
#   probe2 / probe4: 1.3B with the CUDA graph at 2 / 4 x 2048 tokens per micro-batch: memory and time of a plain,
#   a probed (forward pass) and an in-step-probed training step (gpu_check.py bench --probe-check)
#   fp8_v2_a8 / fp8_v2_a4: precision.fp8_backward off / on over seeds (tools/megatron/fp8_loss_summary.py)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
for step in "$@"; do
case "$step" in
tests)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -3 | tee $OUT/kernel_gpu_tests.txt ;;
mtests)
  timeout 200 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tee $OUT/megatron_gpu_full.txt | tail -40 > $OUT/megatron_gpu_tests.txt; tail -3 $OUT/megatron_gpu_tests.txt ;;
app)
  OUT=$OUT/app_check timeout 400 bash tools/megatron/graph_app_check.sh 2>&1 | tee $OUT/app_check.txt ;;
probe2|probe4)
  mbs=${step#probe}
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-v2_a8 v2_a4} --seq 2048 --mbs $mbs --gbs $((4 * mbs)) --vocab 32000 \
    --warmup 4 --iters 3 --cuda-graph --probe-check --profile $OUT/prof --out $OUT/probe.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-900 ;;
fp8_v2_a8|fp8_v2_a4)  # precision.fp8_backward on / off over seeds (25M, seq 256, 16 x 256 tokens, 300 steps)
  prec=${step#fp8_}; mkdir -p $OUT/fp8loss
  C="--models 25M --seq 256 --mbs 4 --gbs 16 --lr 1e-3 --vocab 1024 --steps ${FP8_STEPS:-300} ${FP8_EXTRA:-}"
  for seed in ${SEEDS:-1 2 3}; do
    timeout 150 $G curve --engine megatron --precision $prec $C --seed $seed --out $OUT/fp8loss/${prec}_s${seed}_bf16bwd.json 2>&1 | grep -E "Error" | tail -2
    timeout 150 $G curve --engine megatron --precision $prec $C --seed $seed --fp8-backward --out $OUT/fp8loss/${prec}_s${seed}_fp8bwd.json 2>&1 | grep -E "Error" | tail -2
  done
  python tools/megatron/fp8_loss_summary.py $OUT/fp8loss | tail -8 ;;
esac
done
