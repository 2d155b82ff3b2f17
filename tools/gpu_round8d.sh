#!/usr/bin/env bash
# Session 4 of 2026-11-24, one H100: the Hadamard stage order (HMODE 3 vs 4) and tile sweep; GPU kernel tests.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
timeout 330 python tools/kernels/sweep.py --only hmode --out $OUT/sweep_hmode.jsonl 2>&1 | grep -E "^copy|^hmode|Error" | tee $OUT/sweep_hmode.txt
timeout 220 python -m pytest -q -p no:warnings -p no:logging -m gpu tests/test_kernels_gpu.py -x 2>&1 | tail -3 | tee $OUT/kernel_tests.txt
