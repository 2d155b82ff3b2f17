#!/usr/bin/env bash
# Session 3 of 2026-11-24, one H100: megatron GPU tests, the FP8-backward loss impact, 400M / 1.3B throughput
# at larger micro-batches. Start with the wheel install line of ../shared/device/wheels.sh.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
timeout 150 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_megatron_gpu.py 2>&1 | tail -3 | tee $OUT/megatron_tests.txt
# FP8 backward GEMMs vs bf16 backward GEMMs: same seed, same batches, 150 steps
mkdir -p $OUT/fp8; C="--models small --seq 256 --mbs 4 --gbs 8 --lr 1e-3 --vocab 1024 --steps 150"
for p in v2_a8 v2_a4; do
  timeout 60 $G curve --engine megatron --precision $p $C --out $OUT/fp8/${p}_bf16bwd.json 2>&1 | grep -E "^\[curve|Error"
  timeout 60 $G curve --engine megatron --precision $p --fp8-backward $C --out $OUT/fp8/${p}_fp8bwd.json 2>&1 | grep -E "^\[curve|Error"
  $G compare $OUT/fp8/${p}_bf16bwd.json $OUT/fp8/${p}_fp8bwd.json --out $OUT/fp8/compare.jsonl | tail -1 | cut -c1-300
done
timeout 170 $G bench --model 400M --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 8 --gbs 32 --vocab 32000 --warmup 2 --iters 5 \
  --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-230
timeout 200 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 8 --gbs 32 --vocab 32000 --warmup 2 --iters 4 \
  --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-230
