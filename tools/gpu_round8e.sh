#!/usr/bin/env bash
# Session 4 of 2026-11-24, one H100: GPU kernel tests after folding HMODE 4 into block_fwht_rows; HMODE 3 vs 4.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
timeout 240 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_kernels_gpu.py 2>&1 | tail -3 | tee $OUT/kernel_tests.txt
timeout 120 python - <<'PY' 2>&1 | tee $OUT/hmode4_check.txt
import torch
from bitnet_dist.kernels.norm_hadamard_quant import flat_config, norm_hadamard_backward, norm_hadamard_quant
torch.manual_seed(0)
for D, hb in ((2048, 256), (4096, 64), (8192, 256)):
    x = torch.randn(4096, D, device="cuda", dtype=torch.bfloat16); g = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
    gu = torch.randn_like(x)
    a = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=hb, eps=1e-5, config=flat_config(D, hb, hmode=3))
    b = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=hb, eps=1e-5, config=flat_config(D, hb, hmode=4))
    ga = norm_hadamard_backward(gu, x, g, a[2], hadamard_block=hb, config=flat_config(D, hb, hmode=3, warps=8, prefetch=False))
    gb = norm_hadamard_backward(gu, x, g, a[2], hadamard_block=hb, config=flat_config(D, hb, hmode=4, warps=8, prefetch=False))
    print(f"D={D} hb={hb}: code mismatch {float((a[0] != b[0]).float().mean()):.2g}, max code diff "
          f"{int((a[0].int() - b[0].int()).abs().max())}, scale max rel {float(((a[1] - b[1]).abs() / a[1]).max()):.2g}, "
          f"grad_x max diff {float((ga[0].float() - gb[0].float()).abs().max()):.3g}")
PY
