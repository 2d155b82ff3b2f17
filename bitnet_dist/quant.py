"""BitNet v2 quantizers: the reference math (docs/method.md describes the method).

    RoundClip(x, a, b) = min(max(round(x), a), b)
    weights   (ternary, absmean): alpha = mean|W|       Wq = RoundClip(W / alpha, -1, 1)   -> alpha * Wq
    INT8 acts (per token, absmax): gamma = max|x|      xq = RoundClip(127 x / gamma, -128, 127)
    INT4 acts (per token, absmean): beta = mean|x|     xq = RoundClip(sqrt(7) x / beta, -8, 7)

Every function here returns the quantization *scale* so that ``dequantized = codes * scale``:
weights: scale = alpha; INT8: scale = gamma / 127; INT4: scale = beta / sqrt(7).

Decisions (documented in docs/numerics.md):
* The papers' "+eps" has no value; like Microsoft's reference code we clamp the statistic (alpha, gamma,
  beta) from below at SCALE_EPS = 1e-5. An all-zero token therefore has a finite scale and zero codes.
* Rounding is round-half-to-even (torch.round), identical in the Triton kernels.
* Statistics are computed in fp32 (fp64 for fp64 inputs); fake-quantized outputs keep the input dtype.
* Straight-through estimator (STE): forward = exactly the quantized value, backward = identity
  (an autograd Function; ``x + (q - x).detach()`` is inexact in bf16). Statistics carry no gradient.
* Tensor parallelism: a ``group`` all-reduces the statistics so a feature-sharded tensor quantizes as if
  it were whole (MAX for absmax, SUM for abs-sums and counts). Fused weights (QKV, gate|up) take one
  scale per ``segments`` id, equal to what separate projections with their own scales compute.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from bitnet_dist.errors import ConfigError

SCALE_EPS = 1e-5
SQRT7 = math.sqrt(7.0)
# Integer code range of each activation bit width (the Triton kernels clip to the same ranges).
QRANGE = {8: (-128, 127), 4: (-8, 7)}


def group_size(group) -> int:
    """Ranks in a tensor-parallel ``group`` (1 for None or without an initialized process group)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _stat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _all_reduce_(t: torch.Tensor, group, op) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q):
        return q

    @staticmethod
    def backward(ctx, dy):
        return dy, None


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward exactly ``q``, backward the identity w.r.t. ``x``.

    The usual ``x + (q - x).detach()`` is not exact in bf16: with an outlier x = 9984 clipped to q = 105.5,
    q - x rounds to -9856 and the forward value becomes 128. An autograd Function returns q itself.
    """
    return _STE.apply(x, q.detach())


def check_act_bits(bits: int) -> None:
    if bits not in QRANGE:
        raise ConfigError("precision.act_bits", bits, "4 or 8")


# ---------------------------------------------------------------------------------------- weights
def segment_sums(v: torch.Tensor, segments: torch.Tensor, n: int) -> torch.Tensor:
    """[n] sums of v [rows] over the rows of each segment id (ids in [0, n)), in one fixed order on every run:
    ``index_add_`` on CUDA accumulates with atomics, whose order (and so the fp32 sum's last bits) changes from
    run to run, and a different last bit of a weight scale can flip a ternary code and move the whole curve
    (measured on the H100: two fresh v2_a8 runs of the tiny model apart from the second step on)."""
    onehot = segments[None, :] == torch.arange(n, device=v.device)[:, None]
    return torch.where(onehot, v[None, :], torch.zeros((), dtype=v.dtype, device=v.device)).sum(dim=1)


@torch.no_grad()
def weight_absmean(w: torch.Tensor, segments: Optional[torch.Tensor] = None, num_segments: Optional[int] = None,
                   group=None) -> torch.Tensor:
    """Ternary scale alpha = mean|W| per segment, as fp32 [rows, 1].

    ``segments``: LongTensor [rows] of segment ids (None: the whole matrix is one segment).
    ``group``: TP group over which ``w`` is sharded (sums and counts are all-reduced).
    """
    a = _stat(w).abs()
    rows, cols = a.shape
    if segments is None:
        stat = torch.stack([a.sum(), a.new_full((), float(a.numel()))])
        _all_reduce_(stat, group, dist.ReduceOp.SUM)
        return (stat[0] / stat[1]).clamp_min(SCALE_EPS).expand(rows, 1)
    n = num_segments if num_segments is not None else int(segments.max().item()) + 1
    stat = torch.stack([segment_sums(a.sum(dim=1), segments, n),
                        segment_sums(torch.full((rows,), float(cols), device=a.device, dtype=a.dtype), segments, n)])
    _all_reduce_(stat, group, dist.ReduceOp.SUM)
    alpha = (stat[0] / stat[1].clamp_min(1.0)).clamp_min(SCALE_EPS)
    return alpha[segments].unsqueeze(1)


@torch.no_grad()
def ternary_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes in {-1, 0, 1}: RoundClip(W / alpha, -1, 1)."""
    return torch.round(_stat(w) / scale).clamp_(-1, 1).to(torch.int8)


def weight_quant(w: torch.Tensor, segments: Optional[torch.Tensor] = None, num_segments: Optional[int] = None,
                 group=None) -> torch.Tensor:
    """Fake-quantized ternary weight ``alpha * Wq`` with STE, same dtype as ``w``."""
    scale = weight_absmean(w, segments, num_segments, group)
    q = (ternary_codes(w, scale).to(scale.dtype) * scale).to(w.dtype)
    return ste(w, q)


# ------------------------------------------------------------------------------------ activations
@torch.no_grad()
def act_scale(x: torch.Tensor, bits: int, group=None, full_dim: Optional[int] = None) -> torch.Tensor:
    """Per-token scale [..., 1] fp32: INT8 absmax/127, INT4 absmean/sqrt(7).

    ``group``/``full_dim``: when ``x`` is the local feature shard of a TP-sharded token, the statistic is
    all-reduced over ``group`` (MAX / SUM) and the mean divides by ``full_dim`` (default: local dim times
    the group size).
    """
    check_act_bits(bits)
    a = _stat(x).abs()
    if bits == 8:
        gamma = a.amax(dim=-1, keepdim=True)
        _all_reduce_(gamma, group, dist.ReduceOp.MAX)
        return gamma.clamp_min(SCALE_EPS) / 127.0
    s = a.sum(dim=-1, keepdim=True)
    _all_reduce_(s, group, dist.ReduceOp.SUM)
    n = full_dim if full_dim is not None else x.shape[-1] * group_size(group)
    return (s / n).clamp_min(SCALE_EPS) / SQRT7


@torch.no_grad()
def act_codes(x: torch.Tensor, bits: int, group=None, full_dim: Optional[int] = None):
    """(int8 codes, fp32 scale [..., 1]) with ``codes * scale`` the dequantized activation."""
    scale = act_scale(x, bits, group, full_dim)
    lo, hi = QRANGE[bits]
    return torch.round(_stat(x) / scale).clamp_(lo, hi).to(torch.int8), scale


def act_quant(x: torch.Tensor, bits: int, group=None, full_dim: Optional[int] = None) -> torch.Tensor:
    """Fake-quantized per-token activation with STE, same dtype as ``x``."""
    codes, scale = act_codes(x, bits, group, full_dim)
    return ste(x, (codes.to(scale.dtype) * scale).to(x.dtype))


def quant_error(x: torch.Tensor, bits: int, group=None, full_dim: Optional[int] = None) -> torch.Tensor:
    """Relative quantization error ||x - Q(x)|| / ||x|| (scalar fp32, no grad), for telemetry."""
    with torch.no_grad():
        codes, scale = act_codes(x, bits, group, full_dim)
        xf = _stat(x)
        return ((xf - codes.to(xf.dtype) * scale).norm() / xf.norm().clamp_min(1e-30)).float()
