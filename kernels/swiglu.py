"""SwiGLU on h = [gate | up] (the fc1 output, [T, 2K] rows), forward and backward, one pass each.

    x      = silu(gate) * up                 silu(g) = g / (1 + exp(-g))
    d_up   = dx * silu(gate)
    d_gate = silu'(gate) * (dx * up)         silu'(g) = s * (1 + g * (1 - s)),  s = 1 / (1 + exp(-g))

The rounding points are torch's (fp32 arithmetic, one rounding per torch op: silu(gate) is rounded to the
input dtype before the product, dx * up before silu's backward), with libdevice's exp and IEEE division,
the functions torch's CUDA kernels call. torch runs each op as its own kernel, and on the strided halves of
h they cannot vectorize (H100, 1.3B Wdown, 8192 tokens: 1.19 ms for megatron's SwiGLU forward + backward;
tools/kernels/swiglu_probe.py). Here the forward reads h once and writes x; the backward reads h and dx
and writes dh into h's layout; ``SwiGLUFunction`` keeps only h (as megatron's fused SwiGLU does).

Torch twin: ``swiglu_reference`` / ``swiglu_backward_reference`` (the same torch ops as megatron's MLP).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FastLaunch, interpreting, round_to

if interpreting():
    @triton.jit
    def _exp(x):
        return tl.exp(x)  # numpy's float32 exp (the interpreter has no libdevice)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)  # __nv_expf, what torch's CUDA silu calls (not ex2.approx)


@triton.jit
def swiglu_values(g, u, XDT: tl.constexpr, X_BF16: tl.constexpr):
    """(x, e) for fp32 gate / up tiles: x = silu(g) * u with torch's roundings (fp32, bf16-exact for bf16), and
    e = exp(-g), which ``swiglu_grads`` reuses. Shared by these kernels and the fused H-BitLinear kernels."""
    e = _exp(-g)
    s = round_to(tl.math.div_rn(g, 1.0 + e), XDT, X_BF16)
    return round_to(s * u, XDT, X_BF16), e


@triton.jit
def swiglu_grads(g, u, e, dx, XDT: tl.constexpr, X_BF16: tl.constexpr):
    """(d_gate, d_up) as fp32 tiles (rounded to XDT) from gate, up, e = exp(-gate) and dx (values of XDT)."""
    silu = round_to(tl.math.div_rn(g, 1.0 + e), XDT, X_BF16)
    d_up = round_to(dx * silu, XDT, X_BF16)
    t = round_to(dx * u, XDT, X_BF16)
    sig = tl.math.div_rn(1.0, 1.0 + e)
    d_gate = round_to(t * sig * tl.fma(g, 1.0 - sig, 1.0), XDT, X_BF16)
    return d_gate, d_up


@triton.jit
def _swiglu_fwd_kernel(H, X, K, stride_h, stride_x, XDT: tl.constexpr, X_BF16: tl.constexpr, BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = cols < K
    g = tl.load(H + row * stride_h + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(H + row * stride_h + K + cols, mask=m, other=0.0).to(tl.float32)
    x, _ = swiglu_values(g, u, XDT, X_BF16)
    tl.store(X + row * stride_x + cols, x.to(XDT), mask=m)


@triton.jit
def _swiglu_bwd_kernel(H, DX, DH, K, stride_h, stride_dx, stride_dh, XDT: tl.constexpr, X_BF16: tl.constexpr,
                       BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = cols < K
    g = tl.load(H + row * stride_h + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(H + row * stride_h + K + cols, mask=m, other=0.0).to(tl.float32)
    dx = tl.load(DX + row * stride_dx + cols, mask=m, other=0.0).to(tl.float32)
    d_gate, d_up = swiglu_grads(g, u, _exp(-g), dx, XDT, X_BF16)
    tl.store(DH + row * stride_dh + cols, d_gate.to(XDT), mask=m)
    tl.store(DH + row * stride_dh + K + cols, d_up.to(XDT), mask=m)


_FWD, _BWD = FastLaunch(_swiglu_fwd_kernel), FastLaunch(_swiglu_bwd_kernel)
_BK = 1024


def kernel_applies(h: torch.Tensor) -> bool:
    """The kernels take bf16 / fp32 rows of unit feature stride on CUDA (or under the interpreter)."""
    return (h.dtype in (torch.bfloat16, torch.float32) and h.shape[-1] % 2 == 0 and h.stride(-1) == 1
            and (h.is_cuda or interpreting()))


def _launch_dtype(t: torch.Tensor):
    return (tl.bfloat16 if t.dtype == torch.bfloat16 else tl.float32), t.dtype == torch.bfloat16


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim -> [..., K] in h's dtype."""
    if not kernel_applies(h):
        return swiglu_reference(h)
    K = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * K)
    x = torch.empty(h2.shape[0], K, device=h.device, dtype=h.dtype)
    if h2.shape[0]:
        xdt, bf = _launch_dtype(h)
        _FWD[(h2.shape[0], triton.cdiv(K, _BK))](h2, x, K, h2.stride(0), x.stride(0), XDT=xdt, X_BF16=bf, BK=_BK,
                                                 num_warps=4)
    return x.view(*h.shape[:-1], K)


def swiglu_backward(h: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. h = [gate | up] of ``swiglu(h)`` given dx (same shape as swiglu(h)) -> h's shape."""
    if not kernel_applies(h) or dx.dtype != h.dtype:
        return swiglu_backward_reference(h, dx)
    K = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * K)
    dx2 = dx.reshape(-1, K)
    if dx2.stride(-1) != 1:
        dx2 = dx2.contiguous()
    dh = torch.empty(h2.shape[0], 2 * K, device=h.device, dtype=h.dtype)
    if h2.shape[0]:
        xdt, bf = _launch_dtype(h)
        _BWD[(h2.shape[0], triton.cdiv(K, _BK))](h2, dx2, dh, K, h2.stride(0), dx2.stride(0), dh.stride(0), XDT=xdt,
                                                 X_BF16=bf, BK=_BK, num_warps=4)
    return dh.view(h.shape)


# ------------------------------------------------------------------------------------ torch twins
def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """megatron MLP's SwiGLU ops (bf16 in, one rounding per op)."""
    gate, up = torch.chunk(h, 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_backward_reference(h: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The ops autograd runs for ``swiglu_reference`` (mul's and silu's backward), bit for bit."""
    gate, up = torch.chunk(h, 2, dim=-1)
    d_gate = torch.ops.aten.silu_backward(dx * up, gate)
    d_up = dx * torch.nn.functional.silu(gate)
    return torch.cat([d_gate, d_up], dim=-1)


class SwiGLUFunction(torch.autograd.Function):
    """swiglu with only h kept for backward (the product is not)."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return swiglu(h)

    @staticmethod
    def backward(ctx, dx):
        (h,) = ctx.saved_tensors
        return swiglu_backward(h, dx)


def swiglu_op(h: torch.Tensor) -> torch.Tensor:
    """Differentiable SwiGLU that keeps only h (bf16 / fp32 on CUDA; elsewhere torch autograd on the twin)."""
    return SwiGLUFunction.apply(h) if kernel_applies(h) else swiglu_reference(h)
