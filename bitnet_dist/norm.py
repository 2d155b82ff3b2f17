"""RMSNorm as a megatron ``LayerNormBuilder`` (``RMSNorm(config, hidden_size, eps)``).

megatron's WrappedTorchNorm refuses sequence parallelism (torch_norm.py:32) and apex is not assumed, so
this module tags its weight with ``sequence_parallel`` when the config enables it: under SP each TP rank
normalizes different tokens, and megatron's finalize_model_grads all-reduces the gradients of exactly the
parameters so tagged (distributed/finalize_model_grads.py:354).
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim; fp32 statistics (fp64 for fp64 input), x's
    dtype out."""
    xf = x if x.dtype == torch.float64 else x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight.to(x.dtype)


class RMSNorm(torch.nn.Module):
    """The stand-alone norms (the bf16 model's pre-norms, every model's final norm): torch's fused RMSNorm
    (``F.rms_norm``: one CUDA kernel each way, fp32 statistics, one rounding of x * rstd * weight), as
    megatron's fused (TE / apex) norms would be. ``rms_norm`` above, run eagerly, takes ~7 element-wise kernels
    forward and more backward through fp32 copies, ~0.9 ms per norm and step at 8192 x 2048 tokens on the H100,
    which would slow the bf16 baseline of the end-to-end benchmark (docs/kernels.md).
    The BitLinear layers keep ``rms_norm``: its two roundings are the reference of the fused kernels' codes."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)
