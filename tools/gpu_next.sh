#!/usr/bin/env bash
# What the next session with GPU time should run first (after this session's CPU-only fixes):
#   2 GPUs:  bash tools/megatron/gpu_pp2_verify.sh          (PP2 x VP2 after the p2p fix; resume test)
#   1 GPU :  bash tools/gpu_next.sh                          (this file)
# Start each command with the wheel install line of ../shared/device/wheels.sh and carry .whl and .cache.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
# 1. the engine tests with the step-generation cache fix
timeout 120 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_megatron_gpu.py tests/test_kernels_gpu.py 2>&1 | grep -E "^E |passed|failed" | head -20
# 2. end-to-end throughput again (the codes now recomputed once per step), with a profile of each step
timeout 300 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 2 --iters 5 \
  --profile $OUT/profiles --out $OUT/bench.jsonl 2>&1 | grep -E "^\[|Error" | tail -3
# 3. megatron vs DeepSpeed curves with the fixed cache
mkdir -p /tmp/curves; C="--seq 256 --mbs 4 --gbs 8 --lr 1e-3 --vocab 1024 --steps 50"
for e in megatron deepspeed; do timeout 80 $G curve --engine $e --models small $C --out /tmp/curves/${e}_{model}.json 2>&1 | grep -E "^\[|Error"; done
$G compare /tmp/curves/megatron_small.json /tmp/curves/deepspeed_small.json --out $OUT/compare.jsonl | tail -1
