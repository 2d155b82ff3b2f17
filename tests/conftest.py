"""Shared pytest set-up: CPU-friendly defaults for every test process, and the shared helpers.

The tests mirror the package's areas (numerics, kernels, layers_model, engines, data, training, config,
distributed, reports, install); the helpers they share (dist_utils, mp_workers) live here at the root of
tests/, which this file puts on sys.path (spawned ranks inherit it).
"""
import os
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Set before any test module is collected:
# Triton reads the variable when the first @triton.jit function is defined (megatron-core and DeepSpeed define
# their own on import), so setting it inside tests/kernels/test_kernels.py alone would come too late.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
