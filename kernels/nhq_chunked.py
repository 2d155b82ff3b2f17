"""Norm -> Hadamard -> quantize kernels, chunked family: one program owns BM tokens and loops over the row in
chunks (any width; the three phases split into separate launches under tensor parallelism). Forward
``_fwd_kernel`` and backward ``_bwd_kernel`` with their shared jit helpers. The host side (configs, launches)
is ``norm_hadamard_quant``; the module docstring there states the math."""
from __future__ import annotations

import triton
import triton.language as tl

# One definition of the quantizers' constants: the reference numerics (bitnet_dist.quant).
from ._common import (
    block_fwht,
    rint,
    round_to,
)


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
                stat = _max_nan(stat, _stat_of(u, BITS))
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
                    stat = _max_nan(stat, _stat_of(u, BITS))
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
