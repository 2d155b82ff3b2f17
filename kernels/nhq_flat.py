"""Norm -> Hadamard -> quantize kernels, "flat" family: the whole row in one tile, the block transform as a
tensor-core product (forward ``_fwd_flat_kernel``, backward ``_bwd_flat_kernel``). The host side is
``norm_hadamard_quant``."""
from __future__ import annotations

import triton
import triton.language as tl

# One definition of the quantizers' constants: the reference numerics (bitnet_dist.quant).
from ._common import (
    block_fwht,
    block_fwht_rows,
    dot16,
    quotient,
    rint,
    round_to,
)
from .nhq_chunked import _max_nan, _rstd_of, _scale_of


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
