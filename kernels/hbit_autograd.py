"""H-BitLinear / BitLinear as one autograd Function over the fused kernels.

    y = act_quant(fwht(rmsnorm(x))) @ weight_quant(W).T            (STE through both quantizers)

Forward: one fused pass (norm, Hadamard, per-token codes), then the integer GEMM (A8: Triton int8 with the
dequantization in the epilogue; A4: FP8 e4m3 through cuBLASLt, exact). Saved for backward: x (the layer
input, which its producer usually keeps anyway), the int8/FP8 activation codes (1 byte/feature) and two
fp32 scalars per token; no bf16 copy of the normalized or quantized activation.

Backward, bf16 by default (the reference's precision):
    grad_u = dy @ (codes_w * alpha)                      [T, K]  cuBLAS bf16
    grad_W = dy.T @ (codes_a * s_a)                      [N, K]  cuBLAS bf16
    grad_x, grad_g = RMSNorm-backward(fwht(grad_u))      one fused kernel (+ TP all-reduce of a dot)
``fp8_backward=True``: both GEMMs in FP8 e4m3 with fp32 accumulation. dy is scaled per row (per token for
grad_u, per output channel for grad_W) with the weight / activation scales folded in first; the ternary
codes are exact in e4m3, INT4 codes too, INT8 codes are rounded to e4m3's 4 significant bits.
"""
from __future__ import annotations

from typing import Optional

import torch

from .gemm import colwise_fp8_t, dy_fp8_both, fp8_available, fp8_gemm, fp8_gemm_t, fp8_transpose, int8_gemm, rowwise_fp8
from .norm_hadamard_quant import SCALE_EPS, SQRT7, fwht_reference, norm_hadamard_backward, norm_hadamard_quant
from .ternary import cached_ternary, dequantize_rows, quantize_weight_reference


def _fp8_ok(*dims: int) -> bool:
    return all(d % 16 == 0 and d > 0 for d in dims)


def weight_fp8(act_bits: int, weight: torch.Tensor) -> bool:
    """Whether the forward runs the FP8 GEMM (A4) and so wants the weight's FP8 codes."""
    N, D = weight.shape
    return act_bits == 4 and fp8_available(weight.device) and _fp8_ok(D, N)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [T, D] with unit feature stride (a copy only where the rows are not evenly strided)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class HBitLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, norm_weight, act_bits, hadamard_block, eps, segments, tp_group, full_dim,
                fp8_backward, glu):
        src = x  # what backward keeps: the input as handed in (h for glu)
        x2 = _rows(x)
        N, D = weight.shape
        use_fp8 = weight_fp8(act_bits, weight)
        tw = cached_ternary(weight, segments, tp_group, fp8=use_fp8)
        # glu: the SwiGLU product is formed inside the fused kernel where it can be (else by the SwiGLU kernel)
        codes, s_a, rstd = norm_hadamard_quant(x2, norm_weight, act_bits=act_bits, hadamard_block=hadamard_block,
                                               eps=eps, full_dim=full_dim, tp_group=tp_group, fp8_codes=use_fp8,
                                               glu=glu)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        if use_fp8:
            b_t, sb_row = tw.fp8_operands()
            y = fp8_gemm_t(codes, b_t, s_a, sb_row, out_dtype=torch.bfloat16)
            if out_dtype != torch.bfloat16:
                y = y.to(out_dtype)
        else:
            y = int8_gemm(codes, tw.codes, s_a, tw.scale, out_dtype=out_dtype)
        del x, x2  # backward re-derives them from src (a view or a recompute: no copy kept)
        ctx.save_for_backward(src, norm_weight, codes, s_a, rstd)
        ctx.tw = tw
        ctx.cfg = (act_bits, hadamard_block, tp_group, full_dim, fp8_backward, glu, weight.dtype)
        return y.view(*src.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        src, norm_weight, codes, s_a, rstd = ctx.saved_tensors
        act_bits, hb, tp_group, full_dim, fp8_backward, glu, w_dtype = ctx.cfg
        tw = ctx.tw
        N, K = tw.codes.shape
        dy2 = dy.reshape(-1, N)
        T = dy2.shape[0]
        gdt = dy.dtype if dy.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        fp8 = fp8_backward and fp8_available(dy.device) and _fp8_ok(T, N, K)
        grad_u = grad_w = grad_x = grad_g = None
        if fp8:
            ones = torch.ones(K, device=dy.device, dtype=torch.float32)
            # grad_u = (dy * alpha) @ codes_w: alpha varies along the contraction, so it goes into dy (scaled
            # per token); grad_W = (dy * s_a)^T @ codes_a: s_a varies along the contraction (tokens), so dy is
            # scaled per channel and transposed. Both from two passes over dy where both are needed.
            if dy2.stride(1) != 1:
                dy2 = dy2.contiguous()
            if need_x and ctx.needs_input_grad[1]:
                d8, sd, e8, se = dy_fp8_both(dy2, tw.scale, s_a)
            elif need_x:
                d8, sd = rowwise_fp8(dy2, tw.scale)
            elif ctx.needs_input_grad[1]:
                e8, se = colwise_fp8_t(dy2, s_a)
            if need_x:
                grad_u = fp8_gemm(d8, tw.fp8_t(), sd, ones, out_dtype=torch.bfloat16)
            if ctx.needs_input_grad[1]:
                grad_w = fp8_gemm(e8, fp8_transpose(codes), se, ones, out_dtype=torch.bfloat16)
        else:
            dyg = dy2.to(gdt)
            if need_x:
                grad_u = dyg @ tw.dequantized(gdt)
            if ctx.needs_input_grad[1]:
                grad_w = dyg.t() @ dequantize_rows(codes, s_a, gdt)
        if need_x:
            # glu: the product is recomputed from h (same values) and the gradient is w.r.t. h
            grad_x, grad_g = norm_hadamard_backward(grad_u, _rows(src), norm_weight, rstd, hadamard_block=hb,
                                                    full_dim=full_dim, tp_group=tp_group, glu=glu)
            grad_x = grad_x.view(src.shape)
            if grad_g is not None:
                grad_g = grad_g.to(norm_weight.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(w_dtype)
        return grad_x, grad_w, grad_g, None, None, None, None, None, None, None, None


def hbit_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: Optional[torch.Tensor], *, act_bits: int,
                hadamard_block: int, eps: float, weight_segments: Optional[torch.Tensor] = None, tp_group=None,
                full_dim: Optional[int] = None, fp8_backward: bool = False, glu: bool = False) -> torch.Tensor:
    """x [..., in_local], weight [out_local, in_local], norm_weight [in_local] or None (no RMSNorm) ->
    y [..., out_local] in x's dtype; differentiable w.r.t. x, weight and norm_weight (STE).

    ``hadamard_block``: 0 = no Hadamard (BitLinear), else a power of two <= 256 dividing in_local.
    ``tp_group``: the weight's abs-sum and count are all-reduced over it (weight sharded over TP).
    ``full_dim``: the global feature count when x holds a TP shard of the features (row-parallel); the
    activation statistics (sum of squares, max |u| or sum |u|) and the RMSNorm backward's per-token dot are
    then all-reduced over ``tp_group``. None (or == in_local): activation statistics stay local.
    The partial output of a row-parallel layer is returned un-reduced (the layer all-reduces it).
    ``glu``: x is the SwiGLU input h = [gate | up] ([..., 2 * in_local]); the layer applies silu(gate) * up
    itself and keeps h instead of that product (recomputed in backward; gradient w.r.t. h).
    """
    if act_bits not in (4, 8):
        raise ValueError(f"act_bits={act_bits}: use 4 or 8")
    k = weight.shape[-1]
    if x.shape[-1] != (2 * k if glu else k):
        raise ValueError(f"hbit_linear: input has {x.shape[-1]} features, weight {k} in_features (glu={glu}): "
                         f"pass x with {k} features, or h = [gate | up] with {2 * k} features and glu=True")
    return HBitLinearFunction.apply(x, weight, norm_weight, act_bits, hadamard_block, eps, weight_segments,
                                    tp_group, full_dim, fp8_backward, glu)


# ------------------------------------------------------------------------------- torch reference twin
def hbit_linear_reference(x, weight, norm_weight, *, act_bits: int, hadamard_block: int, eps: float,
                          weight_segments=None):
    """Single-device torch twin with STE autograd, the same rounding points as the layers' reference path."""
    xf = x.float()
    if norm_weight is not None:
        n = (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / x.shape[-1] + eps)).to(x.dtype)
        n = n * norm_weight.to(x.dtype)
    else:
        n = x
    if hadamard_block > 1:
        u = _STEHadamard.apply(n, hadamard_block)
    else:
        u = n
    with torch.no_grad():
        a = u.float().abs()
        if act_bits == 8:
            s = a.amax(-1, keepdim=True).clamp_min(SCALE_EPS) / 127.0
            lo, hi = -128, 127
        else:
            s = (a.sum(-1, keepdim=True) / u.shape[-1]).clamp_min(SCALE_EPS) / SQRT7
            lo, hi = -8, 7
        uq = (torch.round(u.float() / s).clamp_(lo, hi) * s).to(u.dtype)
        codes_w, alpha = quantize_weight_reference(weight, weight_segments)
        wq = (codes_w.float() * alpha[:, None]).to(weight.dtype)
    uq = u + (uq - u).detach()
    wq = weight + (wq - weight).detach()
    return torch.nn.functional.linear(uq, wq.to(uq.dtype))


class _STEHadamard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n, block):
        ctx.block = block
        return fwht_reference(n.float(), block).to(n.dtype)

    @staticmethod
    def backward(ctx, g):
        return fwht_reference(g.float(), ctx.block).to(g.dtype), None
