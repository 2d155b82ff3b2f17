"""The CPU path for megatron-core (documented in docs/numerics.md, "Running on CPU").

megatron-core 0.16.1 has no CPU path: besides CUDA-only subsystems we never use on CPU (its schedules,
optimizers and RNG tracker), two calls sit on paths the model itself takes and are harmless to redirect
(../shared/reference/megatron-core-notes.md section 2, kind "S"):

* ``torch.cuda.current_device()`` names the device of new buffers: the global memory buffer used by the
  sequence-parallel all-gather, RoPE's ``inv_freq.to(...)``, the TP mappings' all-gather and
  reduce-scatter outputs, DDP's grad buffers and dist_checkpointing. On CPU it returns "cpu".
* ``torch.cuda.synchronize()`` before checkpoint I/O and in p2p becomes a no-op.

``install_cpu_path()`` patches exactly these two functions, and only when CUDA is not available: on a GPU
machine it does nothing, so GPU runs never see it. Call it once before building a model on CPU.
"""
from __future__ import annotations

import torch

_installed = False


def install_cpu_path() -> bool:
    """Redirect megatron's two CUDA device calls to the CPU. Returns True if the patch is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        torch.cuda.current_device = lambda: "cpu"  # torch.empty(..., device="cpu") is valid
        torch.cuda.synchronize = lambda *args, **kwargs: None
        _installed = True
    return True


def cpu_path_active() -> bool:
    return _installed
