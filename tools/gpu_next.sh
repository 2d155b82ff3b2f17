#!/usr/bin/env bash
# What the next session with GPU time should run first (state at the end of session 3, 2026-11-24):
#   2 GPUs:  bash tools/megatron/gpu_pp2_verify.sh          (PP2 x VP2 after the p2p fix; resume test)
#   1 GPU :  bash tools/gpu_next.sh                          (this file)
# Start each command with the wheel install line of ../shared/device/wheels.sh and carry .whl and .cache.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# 1. the megatron resume test after the unshare_adam_steps fix (docs/megatron.md), FastLaunch off and on
for f in 0 1; do
  echo "BITNET_TRITON_FAST_LAUNCH=$f"
  BITNET_TRITON_FAST_LAUNCH=$f timeout 100 python -m pytest -q -p no:warnings -p no:logging -m gpu \
    tests/test_megatron_gpu.py -k resume --tb=line 2>&1 | grep -E "^/|passed|failed" | cut -c1-400
done
# 2. what differs after the load (model, fp32 main params, Adam moments, steps): resume_diag.py
timeout 200 python tools/megatron/resume_diag.py 2>&1 | tail -20
# 3. the GPU kernel tests with FastLaunch on (it is opt-in until 1. is understood)
BITNET_TRITON_FAST_LAUNCH=1 timeout 200 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_kernels_gpu.py 2>&1 | tail -3
