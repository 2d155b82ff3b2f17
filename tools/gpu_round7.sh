#!/usr/bin/env bash
# Session 3 of 2026-11-24, one H100, after the fast-launch change: GPU kernel tests, the megatron resume test
# with its numbers, host overhead, 1.3B throughput at mbs 2 (host-bound before), the layer benchmark.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
timeout 130 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_kernels_gpu.py -k "hbit or int8 or backward or fp8 or ternary or 2048" 2>&1 | tail -4 | tee $OUT/kernel_tests.txt
timeout 90 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_megatron_gpu.py -k resume --tb=line 2>&1 | grep -E "assert|Error|passed|failed" | cut -c1-400 | tee $OUT/resume_test.txt
timeout 60 python tools/kernels/overhead.py --out $OUT/overhead.txt 2>&1 | head -18
timeout 200 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 2 --iters 5 \
  --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-200
timeout 150 python -m bitnet_dist.bench --only layer --tokens 8192 --out $OUT/bench_layer 2>&1 | grep -E "wrote|error" | tail -3
