"""Shared pytest set-up: CPU-friendly defaults for every test process."""
import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
