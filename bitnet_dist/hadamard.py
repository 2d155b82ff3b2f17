"""Normalized block-diagonal Walsh-Hadamard transform (docs/method.md describes its role).

    H_0 = [1],  H_m = 1/sqrt(2) [[H_{m-1}, H_{m-1}], [H_{m-1}, -H_{m-1}]]

``fwht(x, block)`` applies H (size ``block``) independently to each contiguous block of the last
dimension: y[..., j*B:(j+1)*B] = H_B x[..., j*B:(j+1)*B]. It is computed with log2(B) butterfly stages,
O(n log B) work, never as a dense matmul. H is orthonormal and symmetric, so H·H = I and the backward of
y = Hx is dx = H dy: the autograd Function applies the same transform to the upstream gradient and saves
nothing. Under tensor parallelism the block size is fixed by the model config and divides every rank's
slice, so blocks never straddle ranks and the transform is the same at every TP degree.
"""
from __future__ import annotations

import math

import torch

from bitnet_dist.errors import ConfigError


def check_block(block: int, dim: int, key: str = "model.hadamard_block") -> None:
    if block < 1 or block & (block - 1) or dim % block:
        valid = [2 ** k for k in range(0, 16) if dim % 2 ** k == 0]
        raise ConfigError(key, block, f"a power of two dividing the dimension {dim}: one of {valid}")


def _fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        # Pairs (i, i + h) inside each run of 2h entries: (a, b) -> (a + b, a - b).
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = torch.stack((a + b, a - b), dim=3).view(y.shape[0], y.shape[1], block)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).reshape(shape)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulate in fp32 (fp64 for fp64 inputs)."""
    return t if t.dtype == torch.float64 else t.float()


class _FWHT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block):
        ctx.block = block
        return _fwht(_acc(x), block).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        return _fwht(_acc(dy), ctx.block).to(dy.dtype), None


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal normalized Hadamard transform over the last dim; fp32 (fp64) inside, x's dtype out."""
    check_block(block, x.shape[-1])
    if block == 1:
        return x
    return _FWHT.apply(x, block)


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Dense normalized Sylvester Hadamard matrix H_n / sqrt(n) (for tests and references only)."""
    check_block(n, n, "n")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)
