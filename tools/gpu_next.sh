#!/usr/bin/env bash
# What the next session with GPU time should run first (state at the end of session 12, 2026-11-25, H100,
# docs/benchmarks/raw/round15_2026-11-25/: the kernel tests (5d3f563), the megatron GPU tests and the app check
# (60362e8) passed on the session's final kernels (the warp-shuffle kernels also without the Hadamard); the
# benchmark bench_final/ is the committed one. Run these again after any kernel, engine or training-loop change;
# the multi-GPU checks below have never run since their fixes):
#   2 GPUs:     bash tools/megatron/gpu_pp2_verify.sh   (PP2 x VP2 after the p2p fix; TP2 -> TP1 resume)
#   4 / 8 GPUs: bash tools/megatron/gpu_multi.sh        (TP2 x PP2 (x DP2) with SP and the interleaved schedule)
#   1 GPU :     bash tools/gpu_next.sh                  (this file: the one-GPU checks after any kernel change)
# Start each command with the wheel install line of ../shared/device/wheels.sh and carry .whl and .cache.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
timeout 200 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_megatron_gpu.py --tb=line 2>&1 | grep -E "^/|passed|failed" | cut -c1-400
timeout 240 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_kernels_gpu.py 2>&1 | tail -3
OUT=$OUT/app_check timeout 400 bash tools/megatron/graph_app_check.sh 2>&1 | tail -8
timeout 450 python -m bitnet_dist.bench --out "$OUT/bench" 2>&1 | grep -E "^copy|wrote|error|Error" | tail -4
