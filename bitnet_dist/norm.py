"""RMSNorm as a megatron ``LayerNormBuilder`` (``RMSNorm(config, hidden_size, eps)``).

megatron's WrappedTorchNorm refuses sequence parallelism (torch_norm.py:32) and apex is not assumed, so
this module tags its weight with ``sequence_parallel`` when the config enables it: under SP each TP rank
normalizes different tokens, and megatron's finalize_model_grads all-reduces the gradients of exactly the
parameters so tagged (distributed/finalize_model_grads.py:354).
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim; fp32 statistics, x's dtype out."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight.to(x.dtype)


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
