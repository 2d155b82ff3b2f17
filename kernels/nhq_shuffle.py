"""Norm -> Hadamard -> quantize kernels, warp-shuffle family: the block transform in registers with warp
shuffles (forward ``_fwd_shfl_kernel``, backward ``_bwd_shfl_kernel``, the SwiGLU-folded forms included). The
host side (layout checks, register caps) is ``norm_hadamard_quant``."""
from __future__ import annotations

import triton
import triton.language as tl

# One definition of the quantizers' constants: the reference numerics (bitnet_dist.quant).
from ._common import (
    bf16_norm_mul,
    bf16_to_f32,
    fwht_shuffle,
    int8_rn,
    pair_join,
    pair_split,
    quotient,
    rint,
    round_bf16_pair,
    round_to,
)
from .nhq_chunked import _max_nan, _rstd_of, _stat_of
from .swiglu import swiglu_grads, swiglu_values


@triton.jit
def _load_tile_rows(G, cols, cmask, BM: tl.constexpr, EVEN: tl.constexpr):
    """G[cols] repeated over BM rows, loaded straight into the [BM, C] tile's layout (each row's copy from L1):
    a [C] load would need a layout conversion through shared memory, with a barrier, on every tile. EVEN: no mask."""
    p = G + cols[None, :] + tl.zeros([BM, 1], tl.int32)
    if EVEN:
        g = tl.load(p)
    else:
        g = tl.load(p, mask=cmask[None, :], other=0.0)
    return g


@triton.jit
def _fwd_shfl_kernel(X, G, Q, SCALE, RSTD, T, D, stride_x, stride_q, eps, full_dim_f, inv_sqrt_hb,
                     BITS: tl.constexpr, HB: tl.constexpr, HAS_NORM: tl.constexpr, BM: tl.constexpr,
                     C: tl.constexpr, ROUND: tl.constexpr, X_BF16: tl.constexpr, Q_FP8: tl.constexpr,
                     VEC: tl.constexpr, PACKED: tl.constexpr = 0, EVEN: tl.constexpr = False,
                     GLU: tl.constexpr = False):
    """The whole forward chain (no TP reduction, whole rows: D <= C) for BM tokens in the natural [BM, C]
    layout, the Hadamard as warp-shuffle butterflies (``fwht_shuffle``): no tensor cores, no shared memory.
    PACKED (sm_90, ``_common``'s packed helpers), a bit mask: 1 = bf16 pairs in one register (unpacking, the
    norm-weight product, the rounding of u; bf16 activations only), 4 = the int8 codes four per register.
    EVEN (D == C): no column mask, and rows past T load nothing (their values are never stored).
    GLU: X holds h = [gate | up] rows (2D features); x = silu(gate) * up is formed in registers with the SwiGLU
    kernel's arithmetic (``swiglu_values``, the same values) and never written."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, C)
    rmask = rows < T
    if EVEN:
        m = rmask[:, None] & (cols < C)[None, :]
    else:
        m = rmask[:, None] & (cols < D)[None, :]
    PK: tl.constexpr = (PACKED & 1) != 0 and ROUND and X_BF16
    if GLU:
        gt = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        xdt = gt.dtype
        up = tl.load(X + rows[:, None] * stride_x + D + cols[None, :], mask=m, other=0.0)
        xf, _ = swiglu_values(gt.to(tl.float32), up.to(tl.float32), xdt, X_BF16)
    else:
        if EVEN:
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m)
        else:
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        xdt = x.dtype
        if PK:
            xf = bf16_to_f32(x)
        else:
            xf = x.to(tl.float32)
    rstd = _rstd_of(tl.sum(xf * xf, axis=1), full_dim_f, eps, HAS_NORM)
    if HAS_NORM:
        g = _load_tile_rows(G, cols, cols < D, BM, EVEN)
        G_SAME: tl.constexpr = G.dtype.element_ty == X.dtype.element_ty  # then g needs no rounding to x.dtype
        if ROUND and not G_SAME:
            g = round_to(g.to(tl.float32), xdt, X_BF16)
        if PK:
            n = bf16_norm_mul(xf * rstd[:, None], g.to(tl.bfloat16))
        else:
            g = g.to(tl.float32)
            if ROUND:
                n = round_to(round_to(xf * rstd[:, None], xdt, X_BF16) * g, xdt, X_BF16)
            else:
                n = xf * rstd[:, None] * g
    else:
        n = xf
    # For a block of 4**k features the normalization 1 / sqrt(HB) = 2**-k is exact, so it moves from every
    # element to the per-token scale: u and the scale are both SQ = 2**k times larger (the 1e-5 floor too),
    # which leaves every rounding, the quotient and so the codes unchanged (outside the subnormal range).
    SQ: tl.constexpr = (1 if HB == 1 else 2 if HB == 4 else 4 if HB == 16 else 8 if HB == 64
                        else 16 if HB == 256 else 0)
    u = fwht_shuffle(n, cols, BM, C, HB, VEC)
    if SQ == 0:
        u = u * inv_sqrt_hb
    if PK:
        u = pair_join(*round_bf16_pair(*pair_split(u, BM, C)), BM, C)
    elif ROUND:
        u = round_to(u, xdt, X_BF16)
    stat = _stat_of(u, BITS)
    SQF: tl.constexpr = 1.0 if SQ == 0 else SQ * 1.0
    if BITS == 8:
        scale = tl.math.div_rn(_max_nan(stat, 1e-5 * SQF), 127.0)
    else:
        scale = tl.math.div_rn(_max_nan(tl.math.div_rn(stat, full_dim_f), 1e-5 * SQF), 2.6457513110645907)
    inv = tl.math.div_rn(1.0, scale)
    # INT8 absmax needs no clamp: |u| <= max |u| and scale is max |u| / 127 rounded to nearest (or the larger
    # 1e-5 floor), so |u / scale| <= 127 (1 + 2^-23) rounds into [-127, 127].
    if (PACKED & 4) != 0 and BITS == 8 and not Q_FP8:
        qc = int8_rn(quotient(u, scale, inv))
    elif (PACKED & 4) != 0 and not Q_FP8:
        qc = int8_rn(tl.minimum(tl.maximum(quotient(u, scale, inv), -8.0), 7.0))  # = clamp(rint(q), -8, 7)
    else:
        qv = rint(quotient(u, scale, inv))
        if BITS == 4:
            qv = tl.minimum(tl.maximum(qv, -8.0), 7.0)
        if Q_FP8:
            qc = qv.to(tl.float8e4nv)
        else:
            qc = qv.to(tl.int8)
    if SQ != 0:
        scale = scale * (1.0 / SQF)
    tl.store(Q + rows[:, None] * stride_q + cols[None, :], qc, mask=m)
    tl.store(SCALE + rows, scale, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _bwd_shfl_kernel(GU, X, G, RSTD, GX, GGP, T, D, stride_gu, stride_x, stride_gx, inv_full, inv_sqrt_hb,
                     HB: tl.constexpr, HAS_NORM: tl.constexpr, BM: tl.constexpr, C: tl.constexpr,
                     VEC: tl.constexpr, G_TILE: tl.constexpr = False, GLU: tl.constexpr = False,
                     X_BF16: tl.constexpr = False):
    """The backward (no TP reduction, whole rows) in the natural layout with the warp-shuffle Hadamard:
    persistent over token blocks, writes GX and the per-program partial norm-weight gradient GGP[pid, :].
    G_TILE: g re-read per tile in the tile's layout instead of held in registers across the loop.
    GLU: X holds h = [gate | up] (the forward's GLU input); x = silu(gate) * up is recomputed in registers, and
    GX receives the gradient w.r.t. h (2D features): the x gradient rounded to X's dtype, as the unfused path
    stores it, through ``swiglu_grads``."""
    xdt = GX.dtype.element_ty
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, C)
    cmask = cols < D
    if HAS_NORM and not G_TILE:
        g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    gacc = tl.zeros([BM, C], tl.float32)
    for tb in range(pid, tl.cdiv(T, BM), nprog):
        rows = tb * BM + tl.arange(0, BM)
        rmask = rows < T
        m = rmask[:, None] & cmask[None, :]
        gu = tl.load(GU + rows[:, None] * stride_gu + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gn = fwht_shuffle(gu, cols, BM, C, HB, VEC) * inv_sqrt_hb
        if GLU:
            gt = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            up = tl.load(X + rows[:, None] * stride_x + D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xv, e = swiglu_values(gt, up, xdt, X_BF16)
        if HAS_NORM:
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            if GLU:
                xh = xv * rstd[:, None]
            else:
                xh = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32) * rstd[:, None]
            if G_TILE:
                g = _load_tile_rows(G, cols, cmask, BM, False).to(tl.float32)
            a = gn * g
            dot = tl.sum(a * xh, axis=1)
            gacc += gn * xh
            gx = rstd[:, None] * (a - xh * (dot * inv_full)[:, None])
        else:
            gx = gn
        if GLU:
            # the x gradient as the plain kernel stores it (the same conversion), then the SwiGLU backward
            d_gate, d_up = swiglu_grads(gt, up, e, gx.to(xdt).to(tl.float32), xdt, X_BF16)
            tl.store(GX + rows[:, None] * stride_gx + cols[None, :], d_gate.to(xdt), mask=m)
            tl.store(GX + rows[:, None] * stride_gx + D + cols[None, :], d_up.to(xdt), mask=m)
        else:
            tl.store(GX + rows[:, None] * stride_gx + cols[None, :], gx.to(xdt), mask=m)
    if HAS_NORM:
        tl.store(GGP + pid * D + cols, tl.sum(gacc, axis=0), mask=cmask)
