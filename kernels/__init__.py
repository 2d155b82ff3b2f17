"""Triton kernels for BitNet v2's BitLinear / H-BitLinear (installed as ``bitnet_dist.kernels``).

Files: ``norm_hadamard_quant`` (fused RMSNorm -> block Hadamard -> per-token INT8/INT4 codes, and its
backward), ``ternary`` (absmean ternary weights, per-step cache, 2-bit packing), ``gemm`` (int8 GEMM with
the dequantization in its epilogue; FP8 e4m3 for A4), ``hbit_autograd`` (the autograd Function ``hbit_linear``). Each holds
a torch reference twin; tests compare them with ``bitnet_dist.quant`` / ``bitnet_dist.hadamard``.
docs/kernels.md describes the design and docs/benchmarks/ holds the dated measurements.

The layers call ``hbit_linear`` on CUDA when ``available()``; on CPU the kernels only run under
``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

from typing import Optional

import torch


def available() -> bool:
    """CUDA present and Triton importable (the layers' dispatch condition)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def hbit_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: Optional[torch.Tensor], *, act_bits: int,
                hadamard_block: int, eps: float, weight_segments: Optional[torch.Tensor] = None, tp_group=None,
                full_dim: Optional[int] = None, fp8_backward: bool = False, glu: bool = False) -> torch.Tensor:
    """See ``bitnet_dist.kernels.hbit_autograd.hbit_linear`` (imported lazily so that importing this package
    never needs Triton)."""
    from .hbit_autograd import hbit_linear as _impl

    return _impl(x, weight, norm_weight, act_bits=act_bits, hadamard_block=hadamard_block, eps=eps,
                 weight_segments=weight_segments, tp_group=tp_group, full_dim=full_dim, fp8_backward=fp8_backward,
                 glu=glu)


__all__ = ["available", "hbit_linear"]
