"""Shared pytest set-up: CPU-friendly defaults for every test process, and the shared helpers.

The tests mirror the package's areas (numerics, kernels, layers_model, engines, data, training, config,
distributed, reports, install); the helpers they share (dist_utils, mp_workers) live here at the root of
tests/, which this file puts on sys.path (spawned ranks inherit it).
"""
import os
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
