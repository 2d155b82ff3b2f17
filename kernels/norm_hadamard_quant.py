"""Fused RMSNorm -> block Hadamard -> per-token quantization (forward) and its backward.

Forward, per token t with local features x[t, :D] (D = in_local, N = full_dim over the TP group):

    rstd = rsqrt(sum_N x^2 / N + eps)                       (partial sum of squares all-reduced over TP)
    n    = round_x((x * rstd) rounded to x.dtype * g)       (the torch reference rounds to x.dtype too)
    u    = round_x(fwht(n, hadamard_block))                 (normalized block Walsh-Hadamard, fp32 inside)
    INT8: scale = max(max_N |u|, 1e-5) / 127               codes = RoundClip(u / scale, -128, 127)
    INT4: scale = max(sum_N |u| / N, 1e-5) / sqrt(7)       codes = RoundClip(u / scale, -8, 7)

``round_x`` rounds to the activation dtype (bf16 in training), exactly where ``bitnet_dist.norm.rms_norm``,
``bitnet_dist.hadamard.fwht`` and ``bitnet_dist.quant.act_codes`` round, so the kernel's integer codes
equal the reference's except where u / scale lies within float rounding of a .5 tie.

One program owns BM tokens. Without TP and with the row in one chunk (D <= CHUNK) the whole chain runs
in registers: one read of x, one write of codes (1 B/feature) and two fp32 scalars per token. Longer rows
loop over chunks three times (squares, statistic, codes) while the row block stays in L2. Under TP the
three phases are separate launches with the partial statistics (sum of squares; max |u| or sum |u|)
all-reduced in between: ``tp_stats=True`` hands them to the caller.

Backward (STE through the quantizer): gn = fwht(grad_u) (H is symmetric and orthonormal, its own
inverse), then the RMSNorm backward with xh = x * rstd:

    grad_g = sum_tokens gn * xh
    grad_x = rstd * (g * gn - xh * (sum_N g * gn * xh) / N)       (per-token dot all-reduced over TP)

Only x (the layer input, usually kept alive by the producer anyway), rstd and the codes/scales are needed.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._common import (FastLaunch, int_spec, bf16_norm_mul, bf16_to_f32, block_fwht, block_fwht_rows, default_prec,
                      device_capability, dot16, fwht_shuffle, int8_rn, interpreting, next_pow2, num_sms, pair_join,
                      pair_split, quotient, rint, round_bf16_pair, round_to)
from .swiglu import swiglu, swiglu_backward, swiglu_grads, swiglu_values

# One definition of the quantizers' constants: the reference numerics (bitnet_dist.quant).
from bitnet_dist.quant import _QRANGE, SCALE_EPS, SQRT7, _group_size  # noqa: E402,F401


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _load_x(X, rows, rmask, col0, D, stride_x, C: tl.constexpr):
    """x [BM, C] in its own dtype; masked entries are 0 (so are their whole Hadamard blocks)."""
    cols = col0 + tl.arange(0, C)
    m = rmask[:, None] & (cols < D)[None, :]
    return tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0)


@triton.jit
def _u_of(x, G, col0, D, rstd, inv_sqrt_hb, HAS_NORM: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr,
          C: tl.constexpr, PREC: tl.constexpr, ROUND: tl.constexpr, X_BF16: tl.constexpr):
    """u = round_x(fwht(round_x(round_x(x * rstd) * g))) as fp32 [BM, C]."""
    xdt = x.dtype
    xf = x.to(tl.float32)
    if HAS_NORM:
        cols = col0 + tl.arange(0, C)
        g = tl.load(G + cols, mask=cols < D, other=0.0)
        n = xf * rstd[:, None]
        if ROUND:
            n = round_to(n, xdt, X_BF16) * round_to(g.to(tl.float32), xdt, X_BF16)[None, :]
            n = round_to(n, xdt, X_BF16)
        else:
            n = n * g.to(tl.float32)[None, :]
    else:
        n = xf
    if HB > 1:
        u = block_fwht(n, BM, C, HB, PREC, X_BF16) * inv_sqrt_hb
        if ROUND:
            u = round_to(u, xdt, X_BF16)
    else:
        u = n
    return u


@triton.jit
def _load_u(X, G, rows, rmask, col0, D, stride_x, rstd, inv_sqrt_hb,
            HAS_NORM: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr,
            ROUND: tl.constexpr, X_BF16: tl.constexpr):
    x = _load_x(X, rows, rmask, col0, D, stride_x, C)
    return x, _u_of(x, G, col0, D, rstd, inv_sqrt_hb, HAS_NORM, HB, BM, C, PREC, ROUND, X_BF16)


@triton.jit
def _rstd_of(ss, full_dim_f, eps, HAS_NORM: tl.constexpr):
    if HAS_NORM:
        r = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(ss, full_dim_f) + eps))
    else:
        r = tl.full(ss.shape, 1.0, tl.float32)
    return r


@triton.jit
def _max_nan(a, b):
    # tl.max / tl.maximum drop NaN (PTX max.f32): a NaN or inf activation would get a finite scale
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _stat_of(u, BITS: tl.constexpr):
    if BITS == 8:
        s = tl.reduce(tl.abs(u), 1, _max_nan)
    else:
        s = tl.sum(tl.abs(u), axis=1)
    return s


@triton.jit
def _scale_of(stat, full_dim_f, BITS: tl.constexpr):
    if BITS == 8:
        s = tl.math.div_rn(_max_nan(stat, 1e-5), 127.0)
    else:
        s = tl.math.div_rn(_max_nan(tl.math.div_rn(stat, full_dim_f), 1e-5), 2.6457513110645907)
    return s


@triton.jit
def _store_codes(Q, u, scale, rows, rmask, col0, D, stride_q, BITS: tl.constexpr, C: tl.constexpr,
                 Q_FP8: tl.constexpr):
    cols = col0 + tl.arange(0, C)
    m = rmask[:, None] & (cols < D)[None, :]
    if BITS == 8:
        lo = -128.0
        hi = 127.0
    else:
        lo = -8.0
        hi = 7.0
    q = tl.minimum(tl.maximum(rint(tl.math.div_rn(u, scale[:, None])), lo), hi)
    if Q_FP8:
        q = q.to(tl.float8e4nv)
    else:
        q = q.to(tl.int8)
    tl.store(Q + rows[:, None] * stride_q + cols[None, :], q, mask=m)


@triton.jit
def _fwd_kernel(X, G, Q, SCALE, RSTD, SS, STAT, T, D, stride_x, stride_q, eps, full_dim_f, inv_sqrt_hb,
                MODE: tl.constexpr, BITS: tl.constexpr, HB: tl.constexpr, HAS_NORM: tl.constexpr,
                BM: tl.constexpr, C: tl.constexpr, NUM_CHUNKS: tl.constexpr, PREC: tl.constexpr,
                ROUND: tl.constexpr, X_BF16: tl.constexpr, Q_FP8: tl.constexpr):
    """MODE 0: whole chain. TP phases: 1 partial sum of squares -> SS; 2 partial statistic -> STAT
    (SS reduced); 3 codes, scale, rstd (SS and STAT reduced)."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < T
    if MODE == 1:
        ss = tl.zeros([BM], tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * C + tl.arange(0, C)
            m = rmask[:, None] & (cols < D)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        tl.store(SS + rows, ss, mask=rmask)
    elif MODE == 2:
        if HAS_NORM:
            rstd = _rstd_of(tl.load(SS + rows, mask=rmask, other=1.0), full_dim_f, eps, HAS_NORM)
        else:
            rstd = tl.full([BM], 1.0, tl.float32)
        stat = tl.zeros([BM], tl.float32)
        for c in range(NUM_CHUNKS):
            x, u = _load_u(X, G, rows, rmask, c * C, D, stride_x, rstd, inv_sqrt_hb,
                           HAS_NORM, HB, BM, C, PREC, ROUND, X_BF16)
            if BITS == 8:
                stat = tl.maximum(stat, _stat_of(u, BITS))
            else:
                stat += _stat_of(u, BITS)
        tl.store(STAT + rows, stat, mask=rmask)
    elif MODE == 3:
        if HAS_NORM:
            rstd = _rstd_of(tl.load(SS + rows, mask=rmask, other=1.0), full_dim_f, eps, HAS_NORM)
        else:
            rstd = tl.full([BM], 1.0, tl.float32)
        scale = _scale_of(tl.load(STAT + rows, mask=rmask, other=1.0), full_dim_f, BITS)
        for c in range(NUM_CHUNKS):
            x, u = _load_u(X, G, rows, rmask, c * C, D, stride_x, rstd, inv_sqrt_hb,
                           HAS_NORM, HB, BM, C, PREC, ROUND, X_BF16)
            _store_codes(Q, u, scale, rows, rmask, c * C, D, stride_q, BITS, C, Q_FP8)
        tl.store(SCALE + rows, scale, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)
    else:
        if NUM_CHUNKS == 1:
            x = _load_x(X, rows, rmask, 0, D, stride_x, C)
            xf = x.to(tl.float32)
            rstd = _rstd_of(tl.sum(xf * xf, axis=1), full_dim_f, eps, HAS_NORM)
            u = _u_of(x, G, 0, D, rstd, inv_sqrt_hb, HAS_NORM, HB, BM, C, PREC, ROUND, X_BF16)
            scale = _scale_of(_stat_of(u, BITS), full_dim_f, BITS)
            _store_codes(Q, u, scale, rows, rmask, 0, D, stride_q, BITS, C, Q_FP8)
        else:
            ss = tl.zeros([BM], tl.float32)
            if HAS_NORM:
                for c in range(NUM_CHUNKS):
                    cols = c * C + tl.arange(0, C)
                    m = rmask[:, None] & (cols < D)[None, :]
                    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
                    ss += tl.sum(x * x, axis=1)
            rstd = _rstd_of(ss, full_dim_f, eps, HAS_NORM)
            stat = tl.zeros([BM], tl.float32)
            for c in range(NUM_CHUNKS):
                x, u = _load_u(X, G, rows, rmask, c * C, D, stride_x, rstd, inv_sqrt_hb,
                               HAS_NORM, HB, BM, C, PREC, ROUND, X_BF16)
                if BITS == 8:
                    stat = tl.maximum(stat, _stat_of(u, BITS))
                else:
                    stat += _stat_of(u, BITS)
            scale = _scale_of(stat, full_dim_f, BITS)
            for c in range(NUM_CHUNKS):
                x, u = _load_u(X, G, rows, rmask, c * C, D, stride_x, rstd, inv_sqrt_hb,
                               HAS_NORM, HB, BM, C, PREC, ROUND, X_BF16)
                _store_codes(Q, u, scale, rows, rmask, c * C, D, stride_q, BITS, C, Q_FP8)
        tl.store(SCALE + rows, scale, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _load_gn(GU, rows, rmask, cols, cmask, stride_gu, inv_sqrt_hb, HB: tl.constexpr, BM: tl.constexpr,
             C: tl.constexpr, PREC: tl.constexpr, GU_BF16: tl.constexpr):
    m = rmask[:, None] & cmask[None, :]
    gu = tl.load(GU + rows[:, None] * stride_gu + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HB > 1:
        gn = block_fwht(gu, BM, C, HB, PREC, GU_BF16) * inv_sqrt_hb
    else:
        gn = gu
    return gn


@triton.jit
def _bwd_kernel(GU, X, G, RSTD, DOT, GX, GGP, T, D, stride_gu, stride_x, stride_gx, inv_full, inv_sqrt_hb,
                MODE: tl.constexpr, HB: tl.constexpr, HAS_NORM: tl.constexpr, BM: tl.constexpr,
                C: tl.constexpr, NUM_CHUNKS: tl.constexpr, PREC: tl.constexpr, GU_BF16: tl.constexpr):
    """MODE 1: per-token partial dot sum(g * gn * xh) -> DOT (grid over row blocks).
    MODE 0 (one chunk, dot in registers) / MODE 2 (DOT reduced): persistent over row blocks, writes GX
    and the per-program partial norm-weight gradient GGP[pid, :]."""
    pid = tl.program_id(0)
    if MODE == 1:
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < T
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BM], tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * C + tl.arange(0, C)
            cmask = cols < D
            gn = _load_gn(GU, rows, rmask, cols, cmask, stride_gu, inv_sqrt_hb, HB, BM, C, PREC, GU_BF16)
            m = rmask[:, None] & cmask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
            acc += tl.sum(gn * g[None, :] * (x * rstd[:, None]), axis=1)
        tl.store(DOT + rows, acc, mask=rmask)
    else:
        nprog = tl.num_programs(0)
        nblocks = tl.cdiv(T, BM)
        for c in range(NUM_CHUNKS):
            cols = c * C + tl.arange(0, C)
            cmask = cols < D
            gacc = tl.zeros([C], tl.float32)
            if HAS_NORM:
                g = tl.load(G + cols, mask=cmask, other=0.0).to(tl.float32)
            for rb in range(pid, nblocks, nprog):
                rows = rb * BM + tl.arange(0, BM)
                rmask = rows < T
                m = rmask[:, None] & cmask[None, :]
                gn = _load_gn(GU, rows, rmask, cols, cmask, stride_gu, inv_sqrt_hb, HB, BM, C, PREC, GU_BF16)
                if HAS_NORM:
                    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
                    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
                    xh = x * rstd[:, None]
                    gacc += tl.sum(gn * xh, axis=0)
                    a = gn * g[None, :]
                    if MODE == 0:
                        dot = tl.sum(a * xh, axis=1)
                    else:
                        dot = tl.load(DOT + rows, mask=rmask, other=0.0)
                    gx = rstd[:, None] * (a - xh * (dot * inv_full)[:, None])
                else:
                    gx = gn
                tl.store(GX + rows[:, None] * stride_gx + cols[None, :], gx.to(GX.dtype.element_ty), mask=m)
            if HAS_NORM:
                tl.store(GGP + pid * D + cols, gacc, mask=cmask)


# ------------------------------------------------------------------------- "flat" kernels (one chunk)
# The tile is [BM * NB, HBD]: each row is one Hadamard block of one token (HBD = max(block, 16) features,
# NB = blocks per token rounded up to a power of two), loaded straight from memory in that shape. The
# whole block transform is then a single tensor-core product with the [HBD, HBD] matrix kron(I, H_block)
# (HMODE 0; one bf16 product is exact for bf16 activations), or the two-stage product of ``block_fwht``
# (HMODE 1). Per-token sums are [BM * NB] row sums reshaped to [BM, NB]: the big tile never changes
# layout except into the product. Programs are persistent (the H matrix is loaded once per program).
@triton.jit
def _tok_sum(v, BM: tl.constexpr, NB: tl.constexpr):
    return tl.sum(tl.reshape(v, (BM, NB)), axis=1)


@triton.jit
def _tok_max(v, BM: tl.constexpr, NB: tl.constexpr):
    return tl.reduce(tl.reshape(v, (BM, NB)), 1, _max_nan)


@triton.jit
def _per_row(v, BM: tl.constexpr, NB: tl.constexpr):
    """[BM] per-token values -> [BM * NB] per tile row."""
    return tl.reshape(tl.broadcast_to(v[:, None], (BM, NB)), (BM * NB,))


@triton.jit
def _flat_tile(HM, D, BM: tl.constexpr, NB: tl.constexpr, HBD: tl.constexpr, HMODE: tl.constexpr):
    """Tile row / column indices, feature index and mask of the flat layout, and the dense block matrix
    (HMODE 0 only; a placeholder otherwise)."""
    r = tl.arange(0, BM * NB)
    j = tl.arange(0, HBD)
    col = (r % NB)[:, None] * HBD + j[None, :]
    if HMODE == 0:
        Hm = tl.load(HM + j[:, None] * HBD + j[None, :])
    else:
        Hm = tl.zeros([1], tl.float32)
    return r, j, col, col < D, Hm


@triton.jit
def _load_tile(P, tb, r, col, cmask, T, stride, BM: tl.constexpr, NB: tl.constexpr):
    """The flat [BM * NB, HBD] tile of token block ``tb`` (rows past T, and whole blocks past the last, read 0)."""
    rows = tb * BM + r // NB
    return tl.load(P + rows[:, None] * stride + col, mask=(rows < T)[:, None] & cmask, other=0.0)


@triton.jit
def _block_rows(tb, r, cmask, T, BM: tl.constexpr, NB: tl.constexpr):
    """Token block ``tb``: its token indices [BM] and their mask, the token of each tile row [BM * NB] and the
    tile's element mask."""
    toks = tb * BM + tl.arange(0, BM)
    trow = tb * BM + r // NB
    return toks, toks < T, trow, (trow < T)[:, None] & cmask


@triton.jit
def _hadamard_rows(v, Hm, R: tl.constexpr, HBD: tl.constexpr, HB: tl.constexpr, PREC: tl.constexpr,
                   EXACT_BF16: tl.constexpr, HMODE: tl.constexpr):
    """Unnormalized Walsh-Hadamard of every HB-block of v [R, HBD] (fp32)."""
    if HMODE == 0:
        out = dot16(v, Hm, PREC, EXACT_BF16)
    elif HMODE == 1:
        out = block_fwht(v, R, HBD, HB, PREC, EXACT_BF16)
    elif HMODE == 3:
        out = block_fwht_rows(v, R, HBD, HB, PREC, EXACT_BF16, False)
    elif HMODE == 4:
        out = block_fwht_rows(v, R, HBD, HB, PREC, EXACT_BF16, True)
    else:  # 2: no transform (benchmark ablation only: the cost of everything else)
        out = v
    return out


@triton.jit
def _fwd_flat_kernel(X, G, HM, Q, SCALE, RSTD, SS, STAT, T, D, stride_x, stride_q, eps, full_dim_f, inv_sqrt_hb,
                     MODE: tl.constexpr, BITS: tl.constexpr, HB: tl.constexpr, HBD: tl.constexpr,
                     NB: tl.constexpr, HAS_NORM: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
                     ROUND: tl.constexpr, X_BF16: tl.constexpr, Q_FP8: tl.constexpr, HMODE: tl.constexpr,
                     PREFETCH: tl.constexpr):
    """Same MODEs as ``_fwd_kernel`` (0 whole chain; TP phases 1 squares, 2 statistic, 3 codes)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    R: tl.constexpr = BM * NB
    r, j, col, cmask, Hm = _flat_tile(HM, D, BM, NB, HBD, HMODE)
    if HAS_NORM:
        g = tl.load(G + col, mask=cmask, other=0.0).to(tl.float32)
        if ROUND:
            g = round_to(g, X.dtype.element_ty, X_BF16)
    if BITS == 8:
        lo = -128.0
        hi = 127.0
    else:
        lo = -8.0
        hi = 7.0
    nblocks = tl.cdiv(T, BM)
    if PREFETCH:
        x_next = _load_tile(X, pid, r, col, cmask, T, stride_x, BM, NB)
    for tb in range(pid, nblocks, nprog):
        toks, tmask, trow, m = _block_rows(tb, r, cmask, T, BM, NB)
        if PREFETCH:
            # Register double buffering: the next tile's load is in flight while this one is computed.
            x = x_next
            x_next = _load_tile(X, tb + nprog, r, col, cmask, T, stride_x, BM, NB)
        else:
            x = _load_tile(X, tb, r, col, cmask, T, stride_x, BM, NB)
        xdt = x.dtype
        xf = x.to(tl.float32)
        if MODE == 1:
            tl.store(SS + toks, _tok_sum(tl.sum(xf * xf, axis=1), BM, NB), mask=tmask)
        else:
            if HAS_NORM:
                if MODE == 0:
                    ss = _tok_sum(tl.sum(xf * xf, axis=1), BM, NB)
                else:
                    ss = tl.load(SS + toks, mask=tmask, other=1.0)
                rstd = _rstd_of(ss, full_dim_f, eps, HAS_NORM)
                n = xf * _per_row(rstd, BM, NB)[:, None]
                if ROUND:
                    n = round_to(round_to(n, xdt, X_BF16) * g, xdt, X_BF16)
                else:
                    n = n * g
            else:
                rstd = tl.full([BM], 1.0, tl.float32)
                n = xf
            u = _hadamard_rows(n, Hm, R, HBD, HB, PREC, X_BF16, HMODE) * inv_sqrt_hb
            if ROUND:
                u = round_to(u, xdt, X_BF16)
            if BITS == 8:
                srow = tl.reduce(tl.abs(u), 1, _max_nan)
            else:
                srow = tl.sum(tl.abs(u), axis=1)
            if MODE == 2:
                if BITS == 8:
                    tl.store(STAT + toks, _tok_max(srow, BM, NB), mask=tmask)
                else:
                    tl.store(STAT + toks, _tok_sum(srow, BM, NB), mask=tmask)
            else:
                if MODE == 0:
                    if BITS == 8:
                        stat = _tok_max(srow, BM, NB)
                    else:
                        stat = _tok_sum(srow, BM, NB)
                else:
                    stat = tl.load(STAT + toks, mask=tmask, other=1.0)
                scale = _scale_of(stat, full_dim_f, BITS)
                inv = tl.math.div_rn(1.0, scale)
                qv = quotient(u, _per_row(scale, BM, NB), _per_row(inv, BM, NB))
                qv = tl.minimum(tl.maximum(rint(qv), lo), hi)
                if Q_FP8:
                    qc = qv.to(tl.float8e4nv)
                else:
                    qc = qv.to(tl.int8)
                tl.store(Q + trow[:, None] * stride_q + col, qc, mask=m)
                tl.store(SCALE + toks, scale, mask=tmask)
                tl.store(RSTD + toks, rstd, mask=tmask)


@triton.jit
def _bwd_flat_kernel(GU, X, G, HM, RSTD, DOT, GX, GGP, T, D, stride_gu, stride_x, stride_gx, inv_full, inv_sqrt_hb,
                     MODE: tl.constexpr, HB: tl.constexpr, HBD: tl.constexpr, NB: tl.constexpr,
                     HAS_NORM: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, GU_BF16: tl.constexpr,
                     HMODE: tl.constexpr, PREFETCH: tl.constexpr):
    """MODE 1: per-token partial dot sum(g * gn * xh) -> DOT. MODE 0 (dot in registers) / 2 (DOT reduced):
    writes GX and the per-program partial norm-weight gradient GGP[pid, :]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    R: tl.constexpr = BM * NB
    r, j, col, cmask, Hm = _flat_tile(HM, D, BM, NB, HBD, HMODE)
    if HAS_NORM:
        g = tl.load(G + col, mask=cmask, other=0.0).to(tl.float32)
    gacc = tl.zeros([R, HBD], tl.float32)
    nblocks = tl.cdiv(T, BM)
    if PREFETCH:
        gu_next = _load_tile(GU, pid, r, col, cmask, T, stride_gu, BM, NB)
    for tb in range(pid, nblocks, nprog):
        toks, tmask, trow, m = _block_rows(tb, r, cmask, T, BM, NB)
        if PREFETCH:
            gu = gu_next.to(tl.float32)
            gu_next = _load_tile(GU, tb + nprog, r, col, cmask, T, stride_gu, BM, NB)
        else:
            gu = _load_tile(GU, tb, r, col, cmask, T, stride_gu, BM, NB).to(tl.float32)
        gn = _hadamard_rows(gu, Hm, R, HBD, HB, PREC, GU_BF16, HMODE) * inv_sqrt_hb
        if HAS_NORM:
            rstd_r = _per_row(tl.load(RSTD + toks, mask=tmask, other=0.0), BM, NB)
            xh = tl.load(X + trow[:, None] * stride_x + col, mask=m, other=0.0).to(tl.float32) * rstd_r[:, None]
            a = gn * g
            if MODE == 1:
                tl.store(DOT + toks, _tok_sum(tl.sum(a * xh, axis=1), BM, NB), mask=tmask)
            else:
                if MODE == 0:
                    dot = _tok_sum(tl.sum(a * xh, axis=1), BM, NB)
                else:
                    dot = tl.load(DOT + toks, mask=tmask, other=0.0)
                gacc += gn * xh
                gx = rstd_r[:, None] * (a - xh * (_per_row(dot, BM, NB) * inv_full)[:, None])
                tl.store(GX + trow[:, None] * stride_gx + col, gx.to(GX.dtype.element_ty), mask=m)
        else:
            tl.store(GX + trow[:, None] * stride_gx + col, gn.to(GX.dtype.element_ty), mask=m)
    if HAS_NORM and MODE != 1:
        gsum = tl.sum(tl.reshape(gacc, (BM, NB, HBD)), axis=0)
        c2 = tl.arange(0, NB)[:, None] * HBD + j[None, :]
        tl.store(GGP + pid * D + c2, gsum, mask=c2 < D)


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


# ---------------------------------------------------------------------------------------- launchers
_FWD, _FWD_FLAT = FastLaunch(_fwd_kernel), FastLaunch(_fwd_flat_kernel)
_BWD, _BWD_FLAT = FastLaunch(_bwd_kernel), FastLaunch(_bwd_flat_kernel)
_FWD_SHFL, _BWD_SHFL = FastLaunch(_fwd_shfl_kernel), FastLaunch(_bwd_shfl_kernel)

def launch_config(D: int, hadamard_block: int, *, max_chunk: int = 16384, elems: int = 4096):
    """(BM tokens, CHUNK features, num_warps) for a row length D; CHUNK is a power of two >= the block.

    From the H100 sweep (docs/benchmarks/kernels.json, "fused" rows with variants): one chunk per row is
    best up to 16384 features; about 4096 elements per program with 4 warps for short rows, one token
    per program with 8 warps for long ones."""
    C = max(16, min(next_pow2(D), max_chunk), hadamard_block)
    bm = max(1, elems // C, 256 // C)
    return bm, C, 4 if bm * C <= 4096 else 8


FLAT_MAX_FEATURES = 16384


def flat_config(D: int, hadamard_block: int, *, elems: int = 4096, hmode: Optional[int] = None,
                warps: Optional[int] = None, programs_per_sm: int = 2, prefetch: bool = True):
    """("flat", BM tokens, num_warps, HMODE, programs per SM, prefetch) for the flat kernels: about ``elems``
    features per tile and at least 16 tile rows (the tensor-core minimum)."""
    hbd = max(16, hadamard_block)
    nb = next_pow2(triton.cdiv(D, hbd))
    bm = max(1, elems // (nb * hbd), next_pow2(triton.cdiv(16, nb)))
    if warps is None:
        warps = 4 if bm * nb * hbd <= 8192 else 8
    if hmode is None:
        hmode = 3
    return ("flat", bm, warps, hmode, programs_per_sm, prefetch)


def _use_flat(config, D: int, hb: int, *, min_features: int = 0) -> bool:
    if config is not None:
        return config[0] == "flat"
    return hb > 1 and min_features < D <= FLAT_MAX_FEATURES


# Defaults from the H100 sweeps (docs/benchmarks/raw/sweep_2026-11-24e, GPU time from CUDA-graph replays):
# forward: flat kernel with the batched two-stage Hadamard (HMODE 3), ~4096 features per tile, 2 programs
# per SM: 35-43% of copy bandwidth against 23-35% for the chunked kernel. Backward: the chunked kernel up to
# 2048 features (62% vs 52%), the flat kernel with HMODE 1, 8 warps, no prefetch above (48-63% vs 41-59%).
BWD_FLAT_MIN_FEATURES = 2048


_HMATS = {}


def hadamard_matrix(hb: int, hbd: int, dtype: torch.dtype, device) -> torch.Tensor:
    """kron(I_{hbd/hb}, H_hb), unnormalized Sylvester signs (-1/0/1), [hbd, hbd] in ``dtype`` (cached)."""
    key = (hb, hbd, dtype, str(device))
    if key not in _HMATS:
        i = torch.arange(hbd)
        a = (i[:, None] % hb) & (i[None, :] % hb)
        par = torch.zeros_like(a)
        for b in range(max(1, hb.bit_length())):
            par ^= (a >> b) & 1
        h = (1 - 2 * par).float() * ((i[:, None] // hb) == (i[None, :] // hb)).float()
        _HMATS[key] = h.to(device=device, dtype=dtype).contiguous()
    return _HMATS[key]


def _flat_setup(config, D: int, hb: int, prec: int, device):
    _, bm, warps, hmode, per_sm, prefetch = (*config, True)[:6]
    hbd = max(16, hb)
    nb = next_pow2(triton.cdiv(D, hbd))
    if bm & (bm - 1) or bm * nb < 16 or hmode not in (0, 1, 2, 3, 4):
        raise ValueError(f"flat launch config {config}: BM must be a power of two with BM * blocks >= 16, "
                         f"HMODE 0 (dense block product), 1 (two-stage, transposed), 3 (two-stage, batched left product), "
                         f"4 (two-stage, left product first) "
                         f"or 2 (no transform: benchmark only)")
    hm_dtype = torch.bfloat16 if prec == 2 else torch.float32
    hm = hadamard_matrix(hb, hbd, hm_dtype, device) if hmode == 0 else torch.empty(1, device=device)
    return bm, warps, hmode, per_sm, hbd, nb, hm, bool(prefetch)


def _valid(config, hb: int):
    bm, C, warps = config
    if C < max(hb, 16) or C & (C - 1) or bm & (bm - 1) or bm * C < 256:
        raise ValueError(f"launch config (BM={bm}, CHUNK={C}): CHUNK must be a power of two >= max(16, "
                         f"hadamard_block={hb}) and BM * CHUNK >= 256")
    return bm, C, warps


def _check(x2: torch.Tensor, hadamard_block: int, act_bits: int) -> None:
    if act_bits not in _QRANGE:
        raise ValueError(f"act_bits={act_bits}: use 4 or 8")
    D = x2.shape[1]
    hb = hadamard_block
    if hb and (hb & (hb - 1) or D % hb or hb > 256):
        raise ValueError(f"hadamard_block={hb}: the kernels need a power of two <= 256 dividing the local "
                         f"feature count {D} (0 = no Hadamard)")


# ----------------------------------------------------------------------------------------- launch plans
# A layer calls the same kernel with the same row width, dtypes and options on every step; only the token count
# and the tensors change. After the first call of a signature has taken the default warp-shuffle path (config
# chosen, layout checked, register cap checked for spills), a plan keeps what that call worked out (launch
# constants, grid rule, output dtypes) and later calls go straight to the launch (``FastLaunch.launch_keyed``),
# skipping the argument checks, config lookups and per-argument specialization keys: host time, which bounds
# the eager training step of the 1.3B model (docs/kernels.md). The key holds everything the default path's
# decisions read (shapes, strides, pointer alignment, dtypes, options, the module switches and the identity of
# the one-time-check caches, so a test that swaps one out gets the checks again); the launch key adds what
# varies per call and that Triton specializes on (the token count's class, the alignment of per-token vectors).
# BITNET_LAUNCH_PLANS=0 turns them off (A/B measurements).
_PLANS: dict = {}
PLANS_ON = os.environ.get("BITNET_LAUNCH_PLANS", "1") != "0"


def _plan_state() -> tuple:
    return (SHUFFLE_FWD, GLU_FOLD, id(_SHFL_DEFAULT), id(_SHFL_BWD_DEFAULT), id(_GLU_CHECKED), id(_CAP_SPILLED))


def _fwd_plan_key(x2, norm_weight, act_bits, hadamard_block, eps, full_dim, tp_group, fp8_codes, glu):
    D = x2.shape[1] // 2 if glu else x2.shape[1]
    reduce_tp = full_dim is not None and full_dim != D and _group_size(tp_group) > 1
    return ("fwd", x2.device.index, x2.dtype, x2.shape[1], x2.stride(0), x2.stride(1), x2.data_ptr() % 16 == 0,
            None if norm_weight is None else (norm_weight.dtype, norm_weight.data_ptr() % 16 == 0), act_bits,
            hadamard_block, eps, full_dim, reduce_tp, fp8_codes, glu, _plan_state())


class _FwdPlan:
    """The warp-shuffle forward of one call signature (see ``_PLANS``)."""

    __slots__ = ("bm", "D", "qdtype", "tail", "consts", "has_norm")

    def __init__(self, x2, g, D, config, *, act_bits, hb, has_norm, eps, full, fp8_codes, glu):
        self.bm, self.D, self.has_norm = config[1], D, has_norm
        self.qdtype = torch.float8_e4m3fn if fp8_codes else torch.int8
        self.tail = (float(eps), float(full), 1.0 / math.sqrt(hb))
        self.consts = _fwd_shfl_consts(x2, g, D, config, act_bits=act_bits, hb=hb, has_norm=has_norm,
                                       fp8_codes=fp8_codes, glu=glu)[0]

    def __call__(self, x2, norm_weight):
        T, D, dev = x2.shape[0], self.D, x2.device
        q = torch.empty((T, D), device=dev, dtype=self.qdtype)
        scale, rstd = torch.empty((2, T), device=dev, dtype=torch.float32)
        if T:  # q and scale start allocations (aligned); rstd sits 4T bytes in
            _FWD_SHFL.launch_keyed((self, int_spec(T), T % 4 == 0), (-(-T // self.bm), 1, 1),
                                   (x2, norm_weight if self.has_norm else x2, q, scale, rstd, T, D, x2.stride(0), D,
                                    *self.tail), self.consts)
        return q, scale, rstd


def _bwd_plan_key(grad_u, x2, norm_weight, hadamard_block, full_dim, tp_group, glu):
    D = grad_u.shape[1]
    reduce_tp = full_dim is not None and full_dim != D and _group_size(tp_group) > 1
    return ("bwd", x2.device.index, x2.dtype, x2.shape[1], x2.stride(0), x2.stride(1), x2.data_ptr() % 16 == 0,
            grad_u.dtype, D, grad_u.stride(0), grad_u.stride(1), grad_u.data_ptr() % 16 == 0,
            None if norm_weight is None else (norm_weight.dtype, norm_weight.data_ptr() % 16 == 0),
            hadamard_block, full_dim, reduce_tp, glu, _plan_state())


class _BwdPlan:
    """The warp-shuffle backward of one call signature (see ``_PLANS``)."""

    __slots__ = ("bm", "D", "xD", "max_prog", "tail", "consts", "has_norm")

    def __init__(self, x2, D, config, *, hb, has_norm, full, glu):
        self.bm, self.D, self.xD, self.has_norm = config[1], D, x2.shape[1], has_norm
        self.consts, per_sm = _bwd_shfl_consts(x2, D, config, hb=hb, has_norm=has_norm, glu=glu)
        self.max_prog = per_sm * num_sms(x2.device)
        self.tail = (1.0 / full, 1.0 / math.sqrt(hb))

    def __call__(self, grad_u, x2, norm_weight, rstd):
        T, D, dev = grad_u.shape[0], self.D, x2.device
        gx = torch.empty((T, self.xD), device=dev, dtype=x2.dtype)
        if T == 0:
            return gx, (torch.zeros(D, device=dev) if self.has_norm else None)
        nprog = max(1, min(-(-T // self.bm), self.max_prog))
        ggp = torch.empty((nprog, D), device=dev, dtype=torch.float32) if self.has_norm else gx
        _BWD_SHFL.launch_keyed((self, int_spec(T), rstd.data_ptr() % 16 == 0), (nprog, 1, 1),
                               (grad_u, x2, norm_weight if self.has_norm else x2, rstd, gx, ggp, T, D,
                                grad_u.stride(0), x2.stride(0), self.xD, *self.tail), self.consts)
        return gx, (ggp.sum(0) if self.has_norm else None)


def norm_hadamard_quant(x2: torch.Tensor, norm_weight: Optional[torch.Tensor], *, act_bits: int,
                        hadamard_block: int, eps: float, full_dim: Optional[int] = None, tp_group=None,
                        fp8_codes: bool = False, prec: Optional[int] = None, config=None, glu: bool = False):
    """x2 [T, D] (bf16/fp16/fp32, row stride free, last dim contiguous) -> (codes [T, D] int8 or
    float8_e4m3fn, scale [T] fp32, rstd [T] fp32); dequantized activation = codes * scale[:, None].

    ``norm_weight`` [D] or None (no RMSNorm, rstd = 1). ``full_dim``: global feature count when x2 is the
    local shard of features split over ``tp_group``; the sum of squares and the statistic are then
    all-reduced (SUM; MAX for INT8). None or equal to D: nothing is reduced.
    ``glu``: x2 is h = [gate | up] ([T, 2D]) and the chain runs on x = silu(gate) * up (``kernels.swiglu``'s
    values): in the warp-shuffle kernel x is formed in registers; elsewhere the SwiGLU kernel writes it first.
    """
    pkey = None
    if config is None and PLANS_ON and x2.is_cuda:
        pkey = _fwd_plan_key(x2, norm_weight, act_bits, hadamard_block, eps, full_dim, tp_group, fp8_codes, glu)
        plan = _PLANS.get(pkey)
        if plan is not None:
            return plan(x2, norm_weight)
    if glu:
        return _nhq_glu(x2, norm_weight, act_bits=act_bits, hadamard_block=hadamard_block, eps=eps,
                        full_dim=full_dim, tp_group=tp_group, fp8_codes=fp8_codes, prec=prec, config=config,
                        plan_key=pkey)
    _check(x2, hadamard_block, act_bits)
    assert x2.stride(1) == 1, "last dim must be contiguous"
    T, D = x2.shape
    full = full_dim or D
    reduce_tp = _group_size(tp_group) > 1 and full != D
    hb = hadamard_block if hadamard_block and hadamard_block > 1 else 1
    dev = x2.device
    q = torch.empty((T, D), device=dev, dtype=torch.float8_e4m3fn if fp8_codes else torch.int8)
    scale, rstd = torch.empty((2, T), device=dev, dtype=torch.float32)  # one allocation
    if T == 0:
        return q, scale, rstd
    has_norm = norm_weight is not None
    g = norm_weight if has_norm else x2
    prec = default_prec() if prec is None else prec
    checked = False
    if config is None and SHUFFLE_FWD and x2.is_cuda and not reduce_tp:  # with or without the Hadamard
        config = _default_shuffle(x2, g, act_bits=act_bits, hb=hb, has_norm=has_norm, eps=eps, fp8_codes=fp8_codes)
        checked = config is not None
    if config is not None and config[0] == "shfl":
        _nhq_shfl(x2, g, q, scale, rstd, config, act_bits=act_bits, hb=hb, has_norm=has_norm, eps=eps,
                  full=full, reduce_tp=reduce_tp, fp8_codes=fp8_codes, checked=checked)
        if checked and pkey is not None and not _capturing():
            _PLANS[pkey] = _FwdPlan(x2, g, D, config, act_bits=act_bits, hb=hb, has_norm=has_norm, eps=eps,
                                    full=full, fp8_codes=fp8_codes, glu=False)
        return q, scale, rstd
    if _use_flat(config, D, hb):
        return _nhq_flat(x2, g, q, scale, rstd, config or flat_config(D, hb), act_bits=act_bits, hb=hb,
                         has_norm=has_norm, eps=eps, full=full, reduce_tp=reduce_tp, tp_group=tp_group,
                         fp8_codes=fp8_codes, prec=prec)
    bm, C, warps = _valid(config or launch_config(D, hb), hb)
    n_chunks = triton.cdiv(D, C)
    grid = (triton.cdiv(T, bm),)
    common = dict(BITS=act_bits, HB=hb, HAS_NORM=has_norm, BM=bm, C=C, NUM_CHUNKS=n_chunks, PREC=prec,
                  ROUND=x2.dtype != torch.float32, X_BF16=x2.dtype == torch.bfloat16, Q_FP8=fp8_codes,
                  num_warps=warps)
    args = lambda ss, st: (x2, g, q, scale, rstd, ss, st, T, D, x2.stride(0), q.stride(0), float(eps),  # noqa: E731
                           float(full), 1.0 / math.sqrt(hb))
    if not reduce_tp:
        _FWD[grid](*args(scale, scale), MODE=0, **common)
        return q, scale, rstd
    ss = torch.ones(T, device=dev, dtype=torch.float32)
    if has_norm:
        _FWD[grid](*args(ss, ss), MODE=1, **common)
        dist.all_reduce(ss, op=dist.ReduceOp.SUM, group=tp_group)
    stat = torch.empty(T, device=dev, dtype=torch.float32)
    _FWD[grid](*args(ss, stat), MODE=2, **common)
    dist.all_reduce(stat, op=dist.ReduceOp.MAX if act_bits == 8 else dist.ReduceOp.SUM, group=tp_group)
    _FWD[grid](*args(ss, stat), MODE=3, **common)
    return q, scale, rstd


# The forward and backward default on CUDA without TP-reduced statistics (BITNET_SHUFFLE_HADAMARD=0 turns both
# off): the warp-shuffle kernels, H100 sweeps docs/benchmarks/raw/round9_2026-11-24 (tools/kernels/hlab.py).
# Since 2026-11-25 (session 12) also for layers without the Hadamard (BitLinear: QKV / fc1, BitNet v1), which
# ran the chunked kernels before: the same row-wise kernels with no butterflies (HB = 1).
SHUFFLE_FWD = os.environ.get("BITNET_SHUFFLE_HADAMARD", "1") != "0"


# The packed-register forward (``_fwd_shfl_kernel`` PACKED: bf16x2 and int8x4 PTX) on sm_90 and newer;
# BITNET_PACKED_PTX=0 turns it off. The interpreter runs the same kernel structure with element-wise helpers.
_PACKED_PTX = os.environ.get("BITNET_PACKED_PTX", "1") != "0"


PACKED_ALL = 5  # bit 1: bf16 pairs (unpack, norm product, rounding of u); bit 4: int8 codes four per register


def packed_default(device: torch.device) -> int:
    return PACKED_ALL if _PACKED_PTX and device.type == "cuda" and device_capability(device) >= (9, 0) else 0


def shuffle_config(D: int, *, elems: Optional[int] = None, warps: Optional[int] = None):
    """("shfl", BM tokens, num_warps) for the warp-shuffle forward kernel: whole rows. Default from the H100
    sweep of the packed-register kernel (docs/benchmarks/raw/round10_2026-11-24/lab_pk2.jsonl): one token per
    program and 64 features per thread from 2048 features (2 warps at 2048 and 4096, 4 at 8192, 8 at 16384);
    ~4096 features per tile with 4 warps below."""
    C = max(16, next_pow2(D))
    if elems is None:
        elems = C if C >= 2048 else 4096
    bm = max(1, elems // C)
    if warps is None:
        warps = max(2, min(8, C // 2048)) if bm == 1 and C >= 2048 else 4
    return ("shfl", bm, warps)


def shuffle_vec(bm: int, C: int, warps: int) -> int:
    """Consecutive features per thread in the layout Triton builds for the warp-shuffle kernel: the 1-byte
    code store's 16-byte vector, fewer where the tile has fewer elements per thread (seen in the TTGIR of
    Triton 3.6 / 3.9; checked at run time by ``_shuffle_verified``)."""
    return min(16, bm * C // (32 * warps))


def shuffle_maxnreg(bm: int, C: int, warps: int, elem_bytes: int = 2, hadamard: bool = True) -> Optional[int]:
    """Register cap for the warp-shuffle forward on 16-bit activations, or None (ptxas decides). Measured on the
    H100 with Triton 3.6 (tools/kernels/reglab.py; docs/benchmarks/raw/round14_2026-11-25/, three runs):
    * whole rows of 16384 features on 8 warps took 128 registers per thread, so two programs (16 warps) fitted on
      an SM; capped at 80 (no spills), three fit (24 warps): 74 -> 78-80% (INT8) and 71 -> 77-78% (INT4) of copy
      at 8192 tokens, 76 -> 81-82% and 73 -> 79-81% at 16384 tokens. 76 spilled, 84 / 88 were slower;
    * 2048 features on 2 warps: ptxas took 56 registers; allowed 64 it schedules differently (at most 16 programs
      per SM instead of 18), +0.6 to +2.8 points in each of three runs.
    Elsewhere a cap spilled (8192 features) or was slower (4096). fp32 activations hold twice the registers: no
    cap. Rows without the Hadamard (``hadamard=False``: QKV / fc1 inputs) were not measured under a cap (and
    their kernel, with other live ranges, spilled under one in the GPU test of session 12): no cap.
    ``BITNET_SHFL_MAXNREG=0`` turns it off."""
    if (not _SHFL_MAXNREG or not hadamard or elem_bytes != 2 or interpreting()
            or "maxnreg" not in _cuda_option_fields()):
        return None
    return {(1, 16384, 8): 80, (1, 2048, 2): 64}.get((bm, C, warps))


def _cuda_option_fields() -> frozenset:
    """Launch options this Triton's CUDA backend takes (``maxnreg`` since Triton 3.0)."""
    global _CUDA_OPTIONS
    if _CUDA_OPTIONS is None:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions
            _CUDA_OPTIONS = frozenset(CUDAOptions.__dataclass_fields__)
        except Exception:  # noqa: BLE001 - no CUDA backend: no option
            _CUDA_OPTIONS = frozenset()
    return _CUDA_OPTIONS


_CUDA_OPTIONS = None
_SHFL_MAXNREG = os.environ.get("BITNET_SHFL_MAXNREG", "1") != "0"


def shuffle_layout_ok(x2: torch.Tensor, config, hb: int) -> Optional[str]:
    """None where the warp-shuffle kernel's layout assumption can hold for x2 (see ``fwht_shuffle``), else why not."""
    _, bm, warps = config[:3]
    T, D = x2.shape
    C = max(16, next_pow2(D))
    if C > FLAT_MAX_FEATURES:
        return f"{D} features > {FLAT_MAX_FEATURES} (one tile holds whole rows)"
    if D % 16 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        return "rows not 16-byte aligned or features not a multiple of 16"
    if bm & (bm - 1) or warps & (warps - 1):
        return f"BM={bm} and num_warps={warps} must be powers of two"
    if shuffle_vec(bm, C, warps) < 2:
        return f"tile BM={bm} x {C} too small for {warps} warps"
    if hb > 256:
        return "hadamard_block > 256"
    return None


_SHFL_CHECKED: dict = {}


def _shuffle_verified(x2, g, config, *, act_bits, hb, has_norm, eps, fp8_codes) -> bool:
    """Once per configuration: the warp-shuffle kernel against the tensor-core flat kernel on random rows of
    the same width. A layout other than the one ``fwht_shuffle`` assumes pairs the wrong features and changes
    almost every code, so a mismatch above 1e-3 (or scales off beyond float rounding on over 1% of tokens) turns the
    shuffle path off for that configuration, with a warning."""
    key = (x2.device.index, x2.dtype, g.dtype, x2.shape[1], tuple(config), act_bits, hb, has_norm, fp8_codes)
    ok = _SHFL_CHECKED.get(key)
    if ok is None:
        D = x2.shape[1]
        n = max(64, config[1] * 8)
        gen = torch.Generator(device=x2.device).manual_seed(0)
        xs = (torch.randn(n, D, device=x2.device, generator=gen) * 2).to(x2.dtype)
        gs = (1 + 0.1 * torch.randn(D, device=x2.device, generator=gen)).to(g.dtype) if has_norm else None
        kw = dict(act_bits=act_bits, hadamard_block=hb, eps=eps, fp8_codes=fp8_codes)
        q1, s1, _ = norm_hadamard_quant(xs, gs, config=config, **kw)
        q0, s0, _ = norm_hadamard_quant(xs, gs, config=flat_config(D, hb) if hb > 1 and D <= FLAT_MAX_FEATURES
                                        else launch_config(D, hb), **kw)
        mism = float((q1.float() != q0.float()).float().mean())
        # Scales may differ where one bf16 rounding of the largest |u| flips (the two Hadamards sum in another
        # order) or by float summation order: allow it on 1% of tokens.
        off = float(((s1 - s0).abs() > 1e-5 * s0.abs()).float().mean())
        ok = mism <= 1e-3 and off <= 0.01
        if not ok:
            warnings.warn(f"bitnet_dist.kernels: warp-shuffle Hadamard kernel disagrees with the tensor-core kernel "
                          f"for {config} ({mism:.3g} of codes differ; this Triton builds another register layout): "
                          "using the tensor-core kernel for this shape")
        _SHFL_CHECKED[key] = ok
    return ok


_SHFL_DEFAULT: dict = {}


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _default_shuffle(x2, g, *, act_bits, hb, has_norm, eps, fp8_codes, glu=False):
    """The warp-shuffle config for x2 where it applies and passed its check, else None (cached per shape and
    alignment: this runs on every forward call, and small layers are bound by host time). ``glu``: the config
    of the SwiGLU-folded kernel (``glu_shuffle_config``), its plain form checked here (x2: the gate half)."""
    key = (x2.device.index, x2.dtype, g.dtype, x2.shape[1], x2.stride(0) % 8 == 0 and x2.data_ptr() % 16 == 0,
           act_bits, hb, has_norm, fp8_codes, glu)
    cfg = _SHFL_DEFAULT.get(key, False)
    if cfg is False and _capturing():
        return None  # the one-time check syncs: not inside CUDA-graph capture (the tensor-core kernel runs)
    if cfg is False:
        cfg = glu_shuffle_config(x2.shape[1]) if glu else shuffle_config(x2.shape[1])
        if shuffle_layout_ok(x2, cfg, hb) is not None or not _shuffle_verified(
                x2, g, cfg, act_bits=act_bits, hb=hb, has_norm=has_norm, eps=eps, fp8_codes=fp8_codes):
            cfg = None
        _SHFL_DEFAULT[key] = cfg
    return cfg


def _fwd_shfl_consts(x2, g, D, config, *, act_bits, hb, has_norm, fp8_codes, glu):
    """(constexprs and launch options, register cap, its spill-check key or None) of the warp-shuffle forward."""
    _, bm, warps = config[:3]
    C = max(16, next_pow2(D))
    vec = config[3] if len(config) > 3 and config[3] else shuffle_vec(bm, C, warps)  # explicit: experiments only
    packed = config[4] if len(config) > 4 else packed_default(x2.device)
    cap_key = None  # only where the launcher chose a cap (the per-call host cost stays off the other shapes)
    if len(config) > 5:
        maxnreg = config[5]
    else:
        maxnreg = None if glu else shuffle_maxnreg(bm, C, warps, x2.element_size(), hadamard=hb > 1)
        if maxnreg:
            cap_key = (x2.device.index, x2.dtype, g.dtype, bm, C, warps, act_bits, hb, has_norm, fp8_codes,
                       int(packed))
            if cap_key in _CAP_SPILLED:
                maxnreg = None
    opts = dict(maxnreg=maxnreg) if maxnreg else {}
    consts = dict(BITS=act_bits, HB=hb, HAS_NORM=has_norm, BM=bm, C=C,
                  ROUND=x2.dtype != torch.float32, X_BF16=x2.dtype == torch.bfloat16, Q_FP8=fp8_codes,
                  VEC=vec, PACKED=int(packed), EVEN=D == C, GLU=glu, num_warps=warps, **opts)
    return consts, maxnreg, cap_key


def _nhq_shfl(x2, g, q, scale, rstd, config, *, act_bits, hb, has_norm, eps, full, reduce_tp, fp8_codes,
              checked=False, glu=False):
    T, D = x2.shape[0], q.shape[1]  # glu: x2 holds 2D features
    why = None if checked else "TP-reduced statistics" if reduce_tp else shuffle_layout_ok(x2[:, :D], config, hb)
    if why:
        raise ValueError(f"launch config {config}: the warp-shuffle kernel does not apply here ({why}); "
                         "use config=None (the default)")
    bm = config[1]
    consts, maxnreg, cap_key = _fwd_shfl_consts(x2, g, D, config, act_bits=act_bits, hb=hb, has_norm=has_norm,
                                                fp8_codes=fp8_codes, glu=glu)
    k = _FWD_SHFL[(triton.cdiv(T, bm),)](
        x2, g, q, scale, rstd, T, D, x2.stride(0), q.stride(0), float(eps), float(full), 1.0 / math.sqrt(hb),
        **consts)
    if maxnreg and cap_key is not None and cap_key not in _CAP_CHECKED:
        # The caps were measured with Triton 3.6's ptxas; where another build spills under the cap (slower than no
        # cap, docs/kernels.md), this launch's results are still right and later launches go uncapped.
        _CAP_CHECKED.add(cap_key)
        if getattr(k, "n_spills", 0):
            _CAP_SPILLED.add(cap_key)
            warnings.warn(f"warp-shuffle forward at {D} features: {k.n_spills} bytes spilled under the register cap "
                          f"{maxnreg}; running it uncapped from now on", RuntimeWarning, stacklevel=3)
    return k


# Per (device, dtypes, launch, constexprs): the register cap's compiled kernel was checked for spills / spilled.
_CAP_CHECKED: set = set()
_CAP_SPILLED: set = set()


def _nhq_flat(x2, g, q, scale, rstd, config, *, act_bits, hb, has_norm, eps, full, reduce_tp, tp_group,
              fp8_codes, prec):
    T, D = x2.shape
    bm, warps, hmode, per_sm, hbd, nb, hm, prefetch = _flat_setup(config, D, hb, prec, x2.device)
    nprog = max(1, min(triton.cdiv(T, bm), per_sm * num_sms(x2.device)))
    common = dict(BITS=act_bits, HB=hb, HBD=hbd, NB=nb, HAS_NORM=has_norm, BM=bm, PREC=prec,
                  ROUND=x2.dtype != torch.float32, X_BF16=x2.dtype == torch.bfloat16, Q_FP8=fp8_codes,
                  HMODE=hmode, PREFETCH=prefetch, num_warps=warps)
    args = lambda ss, st: (x2, g, hm, q, scale, rstd, ss, st, T, D, x2.stride(0), q.stride(0), float(eps),  # noqa: E731
                           float(full), 1.0 / math.sqrt(hb))
    grid = (nprog,)
    if not reduce_tp:
        _FWD_FLAT[grid](*args(scale, scale), MODE=0, **common)
        return q, scale, rstd
    ss = torch.ones(T, device=x2.device, dtype=torch.float32)
    if has_norm:
        _FWD_FLAT[grid](*args(ss, ss), MODE=1, **common)
        dist.all_reduce(ss, op=dist.ReduceOp.SUM, group=tp_group)
    stat = torch.empty(T, device=x2.device, dtype=torch.float32)
    _FWD_FLAT[grid](*args(ss, stat), MODE=2, **common)
    dist.all_reduce(stat, op=dist.ReduceOp.MAX if act_bits == 8 else dist.ReduceOp.SUM, group=tp_group)
    _FWD_FLAT[grid](*args(ss, stat), MODE=3, **common)
    return q, scale, rstd


def norm_hadamard_backward(grad_u: torch.Tensor, x2: torch.Tensor, norm_weight: Optional[torch.Tensor],
                           rstd: torch.Tensor, *, hadamard_block: int, full_dim: Optional[int] = None,
                           tp_group=None, prec: Optional[int] = None, config=None, glu: bool = False):
    """grad_u [T, D] (gradient w.r.t. the Hadamard output u) -> (grad_x [T, D] in x2's dtype,
    grad_norm_weight [D] fp32 or None). Same TP convention as ``norm_hadamard_quant``.
    ``glu``: x2 is the forward's h = [gate | up] ([T, 2D]); grad_x is then the gradient w.r.t. h ([T, 2D])."""
    grad_u = grad_u if grad_u.stride(1) == 1 else grad_u.contiguous()
    pkey = None
    if config is None and PLANS_ON and x2.is_cuda:
        pkey = _bwd_plan_key(grad_u, x2, norm_weight, hadamard_block, full_dim, tp_group, glu)
        plan = _PLANS.get(pkey)
        if plan is not None:
            return plan(grad_u, x2, norm_weight, rstd)
    if glu:
        return _nhb_glu(grad_u, x2, norm_weight, rstd, hadamard_block=hadamard_block, full_dim=full_dim,
                        tp_group=tp_group, prec=prec, config=config, plan_key=pkey)
    T, D = x2.shape
    full = full_dim or D
    reduce_tp = _group_size(tp_group) > 1 and full != D
    hb = hadamard_block if hadamard_block and hadamard_block > 1 else 1
    has_norm = norm_weight is not None
    grad_u = grad_u if grad_u.stride(1) == 1 else grad_u.contiguous()
    gx = torch.empty((T, D), device=x2.device, dtype=x2.dtype)
    if T == 0:
        return gx, (torch.zeros(D, device=x2.device) if has_norm else None)
    prec = default_prec() if prec is None else prec
    checked = False
    if (config is None and SHUFFLE_FWD and x2.is_cuda and not reduce_tp
            and grad_u.dtype == x2.dtype and x2.element_size() == 2):
        config = _default_shuffle_bwd(grad_u, x2, norm_weight, rstd, hb=hb)
        checked = config is not None
    if config is not None and config[0] == "shfl":
        out = _nhb_shfl(grad_u, x2, norm_weight, rstd, gx, config, hb=hb, full=full, reduce_tp=reduce_tp,
                        checked=checked)
        if checked and pkey is not None and not _capturing():
            _PLANS[pkey] = _BwdPlan(x2, D, config, hb=hb, has_norm=has_norm, full=full, glu=False)
        return out
    if _use_flat(config, D, hb, min_features=BWD_FLAT_MIN_FEATURES):
        return _nhb_flat(grad_u, x2, norm_weight, rstd, gx,
                         config or flat_config(D, hb, elems=2048, hmode=1, warps=8, prefetch=False), hb=hb,
                         full=full, reduce_tp=reduce_tp, tp_group=tp_group, prec=prec)
    bm, C, warps = _valid(config or launch_config(D, hb, max_chunk=4096, elems=2048), hb)
    n_chunks = triton.cdiv(D, C)
    nblocks = triton.cdiv(T, bm)
    nprog = max(1, min(nblocks, 4 * num_sms(x2.device)))
    ggp = torch.empty((nprog, D), device=x2.device, dtype=torch.float32) if has_norm else gx
    dot = torch.empty(T, device=x2.device, dtype=torch.float32)
    g = norm_weight if has_norm else x2
    common = dict(HB=hb, HAS_NORM=has_norm, BM=bm, C=C, NUM_CHUNKS=n_chunks, PREC=prec,
                  GU_BF16=grad_u.dtype == torch.bfloat16, num_warps=warps)
    args = (grad_u, x2, g, rstd, dot, gx, ggp, T, D, grad_u.stride(0), x2.stride(0), gx.stride(0), 1.0 / full,
            1.0 / math.sqrt(hb))
    if has_norm and (reduce_tp or n_chunks > 1):
        _BWD[(nblocks,)](*args, MODE=1, **common)
        if reduce_tp:
            dist.all_reduce(dot, op=dist.ReduceOp.SUM, group=tp_group)
        _BWD[(nprog,)](*args, MODE=2, **common)
    else:
        _BWD[(nprog,)](*args, MODE=0, **common)
    return gx, (ggp.sum(0) if has_norm else None)


def shuffle_bwd_config(D: int, *, elems: int = 4096, warps: Optional[int] = None,
                       programs_per_sm: Optional[int] = None, g_tile: Optional[bool] = None):
    """("shfl", BM tokens, num_warps, programs per SM, VEC (None: Triton's), G_TILE) for the warp-shuffle
    backward (persistent). Defaults from the H100 sweep at 16384 tokens (raw/round11_2026-11-24/lab_bwd.jsonl,
    % of copy): ~4096 features per tile, 8 warps, 2 programs per SM up to 4096 features (79% / 82%); one
    token per tile with the norm weight re-read per tile (G_TILE) from 8192 features: 8 warps at 8192 (84%,
    was 68% with 4 warps holding g in registers, which spilled), 32 warps and one program per SM at 16384
    (88%, was 67%)."""
    C = max(16, next_pow2(D))
    big = C >= 8192
    if warps is None:
        warps = 32 if C >= 16384 else 8
    if programs_per_sm is None:
        programs_per_sm = 1 if C >= 16384 else 2
    return ("shfl", max(1, elems // C), warps, programs_per_sm, None, big if g_tile is None else g_tile)


def _bwd_layout_why(grad_u, x2, config, hb) -> Optional[str]:
    if grad_u.dtype != x2.dtype:
        return "grad_u and x must share a dtype"
    for t in (grad_u, x2):
        why = shuffle_layout_ok(t, config, hb)
        if why:
            return why
    return None


_SHFL_BWD_DEFAULT: dict = {}


def _default_shuffle_bwd(grad_u, x2, norm_weight, rstd, *, hb, glu=False):
    """The backward's warp-shuffle config where it applies and passed a one-time check against the
    tensor-core kernels (gradients within bf16 rounding; a wrong register layout gives O(1) errors), else None.
    ``glu``: the config of the SwiGLU-folded kernel (``glu_shuffle_bwd_config``; None where it has none), its
    plain form checked here (x2: the gate half)."""
    D = x2.shape[1]
    aligned = all(t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 for t in (grad_u, x2))
    key = (x2.device.index, x2.dtype, None if norm_weight is None else norm_weight.dtype, D, aligned, hb, glu)
    cfg = _SHFL_BWD_DEFAULT.get(key, False)
    if cfg is False and _capturing():
        return None
    if cfg is False:
        cfg = glu_shuffle_bwd_config(D) if glu else shuffle_bwd_config(D)
        if cfg is None or _bwd_layout_why(grad_u, x2, cfg, hb) is not None:
            cfg = None
        else:
            gen = torch.Generator(device=x2.device).manual_seed(0)
            n = max(64, cfg[1] * 8)
            xs = torch.randn(n, D, device=x2.device, generator=gen).to(x2.dtype)
            gus = torch.randn(n, D, device=x2.device, generator=gen).to(x2.dtype)
            gs = None if norm_weight is None else \
                (1 + 0.1 * torch.randn(D, device=x2.device, generator=gen)).to(norm_weight.dtype)
            rs = torch.rsqrt(xs.float().pow(2).mean(1) + 1e-5)
            g1, gg1 = norm_hadamard_backward(gus, xs, gs, rs, hadamard_block=hb, config=cfg)
            ref = (flat_config(D, hb, elems=2048, hmode=1, warps=8, prefetch=False) if hb > 1
                   else launch_config(D, hb, max_chunk=4096, elems=2048))  # no Hadamard: the chunked kernel
            g0, gg0 = norm_hadamard_backward(gus, xs, gs, rs, hadamard_block=hb, config=ref)
            err = float((g1.float() - g0.float()).abs().max()) / max(float(g0.float().abs().max()), 1e-30)
            if gs is not None:
                err = max(err, float((gg1 - gg0).abs().max()) / max(float(gg0.abs().max()), 1e-30))
            if err > 2e-2:
                warnings.warn(f"bitnet_dist.kernels: warp-shuffle backward disagrees with the tensor-core kernel for "
                              f"{cfg} (relative error {err:.3g}; this Triton builds another register layout): "
                              "using the tensor-core kernel for this shape")
                cfg = None
        _SHFL_BWD_DEFAULT[key] = cfg
    return cfg


def _bwd_shfl_consts(x2, D, config, *, hb, has_norm, glu):
    """(constexprs and launch options, programs per SM) of the warp-shuffle backward."""
    _, bm, warps, per_sm = config[:4]
    C = max(16, next_pow2(D))
    vec = config[4] if len(config) > 4 and config[4] else min(16 // x2.element_size(), bm * C // (32 * warps))
    g_tile = bool(config[5]) if len(config) > 5 else False
    return dict(HB=hb, HAS_NORM=has_norm, BM=bm, C=C, VEC=vec, G_TILE=g_tile, GLU=glu,
                X_BF16=x2.dtype == torch.bfloat16, num_warps=warps), per_sm


def _nhb_shfl(grad_u, x2, norm_weight, rstd, gx, config, *, hb, full, reduce_tp, checked=False, glu=False):
    T, D = grad_u.shape  # glu: x2 and gx hold 2D features
    why = (None if checked else "TP-reduced statistics" if reduce_tp
           else _bwd_layout_why(grad_u, x2[:, :D], config, hb))
    if why:
        raise ValueError(f"launch config {config}: the warp-shuffle backward does not apply here ({why}); "
                         "use config=None (the default)")
    has_norm = norm_weight is not None
    consts, per_sm = _bwd_shfl_consts(x2, D, config, hb=hb, has_norm=has_norm, glu=glu)
    nprog = max(1, min(triton.cdiv(T, config[1]), per_sm * num_sms(x2.device)))
    ggp = torch.empty((nprog, D), device=x2.device, dtype=torch.float32) if has_norm else gx
    g = norm_weight if has_norm else x2
    _BWD_SHFL[(nprog,)](grad_u, x2, g, rstd, gx, ggp, T, D, grad_u.stride(0), x2.stride(0), gx.stride(0), 1.0 / full,
                        1.0 / math.sqrt(hb), **consts)
    return gx, (ggp.sum(0) if has_norm else None)


def _nhb_flat(grad_u, x2, norm_weight, rstd, gx, config, *, hb, full, reduce_tp, tp_group, prec):
    T, D = x2.shape
    has_norm = norm_weight is not None
    bm, warps, hmode, per_sm, hbd, nb, hm, prefetch = _flat_setup(config, D, hb, prec, x2.device)
    nprog = max(1, min(triton.cdiv(T, bm), per_sm * num_sms(x2.device)))
    ggp = torch.empty((nprog, D), device=x2.device, dtype=torch.float32) if has_norm else gx
    dot = torch.empty(T, device=x2.device, dtype=torch.float32) if has_norm and reduce_tp else rstd
    g = norm_weight if has_norm else x2
    common = dict(HB=hb, HBD=hbd, NB=nb, HAS_NORM=has_norm, BM=bm, PREC=prec,
                  GU_BF16=grad_u.dtype == torch.bfloat16, HMODE=hmode, PREFETCH=prefetch, num_warps=warps)
    args = (grad_u, x2, g, hm, rstd, dot, gx, ggp, T, D, grad_u.stride(0), x2.stride(0), gx.stride(0), 1.0 / full,
            1.0 / math.sqrt(hb))
    if has_norm and reduce_tp:
        _BWD_FLAT[(nprog,)](*args, MODE=1, **common)
        dist.all_reduce(dot, op=dist.ReduceOp.SUM, group=tp_group)
        _BWD_FLAT[(nprog,)](*args, MODE=2, **common)
    else:
        _BWD_FLAT[(nprog,)](*args, MODE=0, **common)
    return gx, (ggp.sum(0) if has_norm else None)


# ----------------------------------------------------------------------- SwiGLU folded in (fc2 / Wdown)
# The SwiGLU folded into the warp-shuffle kernels (session 15); BITNET_GLU_FOLD=0 composes the SwiGLU kernels
# with the plain ones instead (same values; for A/B measurements and as an escape hatch).
GLU_FOLD = os.environ.get("BITNET_GLU_FOLD", "1") != "0"


def _glu_split(x2: torch.Tensor) -> int:
    if x2.shape[1] % 2:
        raise ValueError(f"glu=True: the input has {x2.shape[1]} features; h = [gate | up] needs an even count")
    assert x2.stride(1) == 1, "last dim must be contiguous"
    return x2.shape[1] // 2


def glu_shuffle_config(D: int):
    """Forward launch config with the SwiGLU folded in: the plain kernel's (``shuffle_config``) with at most 32
    features per thread (two halves are loaded, and exp / IEEE division added). H100, 8192 tokens, A4
    (tools/kernels/glu_lab.py, docs/benchmarks/raw/round18_2026-11-25/): 8192 features on 8 warps 0.178 ms
    (4 warps, the plain kernel's: 0.225; the SwiGLU kernel + plain kernel: 0.225), 16384 on 16 warps 0.390 ms
    (8 warps: 0.456; composed 0.454)."""
    _, bm, warps = shuffle_config(D)
    C = max(16, next_pow2(D))
    return ("shfl", bm, min(16, max(warps, bm * C // 1024)))


def glu_shuffle_bwd_config(D: int):
    """Backward launch config with the SwiGLU folded in, or None (composed kernels): at most 16 features per
    thread on at most 16 warps, one program per SM from 16 warps. H100, 8192 tokens (glu_lab.py): 8192 features
    on 16 warps 0.345 ms (8 warps, 255 registers: 0.436-0.441; composed: 0.542). At 16384 every tried config
    spilled (32 warps are capped at 64 registers: 2.05 ms; 16 warps / 8 warps: 1.82-1.93 ms) against 1.06 ms
    composed: None there."""
    _, bm, warps, per_sm, vec, g_tile = shuffle_bwd_config(D)
    C = max(16, next_pow2(D))
    w = max(warps, bm * C // 512)
    if w > 16:
        return None
    return ("shfl", bm, w, 1 if w >= 16 else per_sm, vec, g_tile)


_GLU_CHECKED: dict = {}


def _glu_verified(kind: str, x2, g, cfg, run, extra: tuple = ()) -> bool:
    """Once per configuration (``extra``: the kernel's other specializations): the GLU form of a warp-shuffle
    kernel equals, bit for bit, the SwiGLU kernel followed by the plain kernel on random rows (it runs the same
    arithmetic); otherwise the caller composes the two with a warning (a Triton that builds another register
    layout for the two-half loads)."""
    key = (kind, x2.device.index, x2.dtype, None if g is None else g.dtype, x2.shape[1], tuple(cfg), *extra)
    ok = _GLU_CHECKED.get(key)
    if ok is None and _capturing():
        return False  # the check syncs: not inside CUDA-graph capture (the composed path runs)
    if ok is None:
        ok = run()
        if not ok:
            warnings.warn(f"bitnet_dist.kernels: the {kind} kernel with the SwiGLU folded in disagrees with the "
                          f"SwiGLU kernel + the plain kernel for {cfg}: composing the two for this shape")
        _GLU_CHECKED[key] = ok
    return ok


def _nhq_glu(h2, norm_weight, *, act_bits, hadamard_block, eps, full_dim, tp_group, fp8_codes, prec, config,
             plan_key=None):
    """``norm_hadamard_quant(..., glu=True)``: one kernel where the warp-shuffle forward applies, else SwiGLU
    kernel + the usual path."""
    D = _glu_split(h2)
    gate = h2[:, :D]
    _check(gate, hadamard_block, act_bits)
    T = h2.shape[0]
    full = full_dim or D
    reduce_tp = _group_size(tp_group) > 1 and full != D
    hb = hadamard_block if hadamard_block and hadamard_block > 1 else 1
    has_norm = norm_weight is not None
    g = norm_weight if has_norm else h2
    kw = dict(act_bits=act_bits, hb=hb, has_norm=has_norm, eps=eps, fp8_codes=fp8_codes)
    cfg, checked = config, False
    if cfg is None and GLU_FOLD and SHUFFLE_FWD and h2.is_cuda and not reduce_tp and T:
        cfg = _default_shuffle(gate, g, glu=True, **kw)  # the plain kernel's layout, checked at D features

        def run():
            gen = torch.Generator(device=h2.device).manual_seed(1)
            hs = (torch.randn(max(64, cfg[1] * 8), 2 * D, device=h2.device, generator=gen) * 2).to(h2.dtype)
            a = norm_hadamard_quant(hs, norm_weight, act_bits=act_bits, hadamard_block=hb, eps=eps,
                                    fp8_codes=fp8_codes, config=cfg, glu=True)
            b = norm_hadamard_quant(swiglu(hs), norm_weight, act_bits=act_bits, hadamard_block=hb, eps=eps,
                                    fp8_codes=fp8_codes, config=cfg)
            return all(torch.equal(u.view(torch.uint8) if u.dtype == torch.float8_e4m3fn else u,
                                   v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v) for u, v in zip(a, b))

        if cfg is not None and not _glu_verified("forward", h2, norm_weight, cfg, run,
                                                 (act_bits, hb, fp8_codes, float(eps))):
            cfg = None
        checked = cfg is not None
    if cfg is None or cfg[0] != "shfl":
        return norm_hadamard_quant(swiglu(h2), norm_weight, act_bits=act_bits, hadamard_block=hadamard_block,
                                   eps=eps, full_dim=full_dim, tp_group=tp_group, fp8_codes=fp8_codes, prec=prec,
                                   config=config)
    q = torch.empty((T, D), device=h2.device, dtype=torch.float8_e4m3fn if fp8_codes else torch.int8)
    scale, rstd = torch.empty((2, T), device=h2.device, dtype=torch.float32)
    if T:
        _nhq_shfl(h2, g, q, scale, rstd, cfg, full=full, reduce_tp=reduce_tp, checked=checked, glu=True, **kw)
        if checked and plan_key is not None and not _capturing():
            _PLANS[plan_key] = _FwdPlan(h2, g, D, cfg, act_bits=act_bits, hb=hb, has_norm=has_norm, eps=eps,
                                        full=full, fp8_codes=fp8_codes, glu=True)
    return q, scale, rstd


def _nhb_glu(grad_u, h2, norm_weight, rstd, *, hadamard_block, full_dim, tp_group, prec, config, plan_key=None):
    """``norm_hadamard_backward(..., glu=True)``: gradient w.r.t. h in one kernel where the warp-shuffle
    backward applies, else SwiGLU recompute + the usual backward + the SwiGLU backward kernel."""
    D = _glu_split(h2)
    T = h2.shape[0]
    full = full_dim or D
    reduce_tp = _group_size(tp_group) > 1 and full != D
    hb = hadamard_block if hadamard_block and hadamard_block > 1 else 1
    grad_u = grad_u if grad_u.stride(1) == 1 else grad_u.contiguous()
    cfg, checked = config, False
    if (cfg is None and GLU_FOLD and SHUFFLE_FWD and h2.is_cuda and not reduce_tp and T and grad_u.dtype == h2.dtype
            and h2.element_size() == 2):
        cfg = _default_shuffle_bwd(grad_u, h2[:, :D], norm_weight, rstd, hb=hb, glu=True)

        def run():
            gen = torch.Generator(device=h2.device).manual_seed(1)
            n = max(64, cfg[1] * 8)
            hs = torch.randn(n, 2 * D, device=h2.device, generator=gen).to(h2.dtype)
            gus = torch.randn(n, D, device=h2.device, generator=gen).to(h2.dtype)
            rs = torch.rand(n, device=h2.device, generator=gen) + 0.5
            a = norm_hadamard_backward(gus, hs, norm_weight, rs, hadamard_block=hb, config=cfg, glu=True)
            gx, gg = norm_hadamard_backward(gus, swiglu(hs), norm_weight, rs, hadamard_block=hb, config=cfg)
            return torch.equal(a[0], swiglu_backward(hs, gx)) and (gg is None or torch.equal(a[1], gg))

        if cfg is not None and not _glu_verified("backward", h2, norm_weight, cfg, run, (hb,)):
            cfg = None
        checked = cfg is not None
    if cfg is None or cfg[0] != "shfl":
        x = swiglu(h2)
        gx, gg = norm_hadamard_backward(grad_u, x, norm_weight, rstd, hadamard_block=hadamard_block,
                                        full_dim=full_dim, tp_group=tp_group, prec=prec, config=config)
        del x
        return swiglu_backward(h2, gx), gg
    gh = torch.empty((T, 2 * D), device=h2.device, dtype=h2.dtype)
    if T == 0:
        return gh, (torch.zeros(D, device=h2.device) if norm_weight is not None else None)
    out = _nhb_shfl(grad_u, h2, norm_weight, rstd, gh, cfg, hb=hb, full=full, reduce_tp=reduce_tp, checked=checked,
                    glu=True)
    if checked and plan_key is not None and not _capturing():
        _PLANS[plan_key] = _BwdPlan(h2, D, cfg, hb=hb, has_norm=norm_weight is not None, full=full, glu=True)
    return out


# ------------------------------------------------------------------------------- torch reference twin
def fwht_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalized block Walsh-Hadamard as a dense fp64 product (independent of the butterfly)."""
    if block <= 1:
        return x
    h = torch.ones(1, 1, dtype=torch.float64, device=x.device)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    y = x.double().reshape(*x.shape[:-1], x.shape[-1] // block, block) @ (h / math.sqrt(block))
    return y.reshape(x.shape)


def norm_hadamard_quant_reference(x2: torch.Tensor, norm_weight: Optional[torch.Tensor], *, act_bits: int,
                                  hadamard_block: int, eps: float):
    """Torch twin of ``norm_hadamard_quant`` (single device): (codes int8, scale [T], rstd [T], u fp32)
    with the same rounding points (x.dtype after the norm, the weight product and the transform)."""
    xf = x2.float()
    if norm_weight is not None:
        rstd = torch.rsqrt(xf.pow(2).sum(-1) / x2.shape[-1] + eps)
        n = (xf * rstd[:, None]).to(x2.dtype) * norm_weight.to(x2.dtype)
    else:
        rstd = torch.ones(x2.shape[0], device=x2.device)
        n = x2
    u = fwht_reference(n.float(), hadamard_block).to(x2.dtype).float() if hadamard_block > 1 else n.float()
    if act_bits == 8:
        scale = u.abs().amax(-1).clamp_min(SCALE_EPS) / 127.0
    else:
        scale = (u.abs().sum(-1) / x2.shape[-1]).clamp_min(SCALE_EPS) / SQRT7
    lo, hi = _QRANGE[act_bits]
    codes = torch.round(u / scale[:, None]).clamp_(lo, hi).to(torch.int8)
    return codes, scale, rstd, u
