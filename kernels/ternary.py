"""Ternary weight quantization (absmean, one scale per segment), its per-step cache, and 2-bit packing.

    alpha_s = max(mean_{rows in segment s, all columns} |W|, 1e-5)      (sums and counts all-reduced over TP)
    codes   = RoundClip(W / alpha_row, -1, 1)                          int8, and the same values in FP8 e4m3

``quantize_weight`` runs three kernels: row abs-sums; the [2, segments] statistic (abs-sum, count x K per
segment, one program, one fixed order), which the caller's TP group all-reduces; the per-row scale and the
codes. Launched by caller-built keys, no torch op in between: the first micro-batch of every step quantizes
every weight of the model, and with a dozen small torch ops per weight that pass left the GPU idle on the
host (docs/kernels.md "Per-step weight quantization"). ``BITNET_FUSED_WEIGHT_QUANT=0`` runs the earlier
composition (``weight_scales`` in torch ops between the abs-sum and codes kernels). ``cached_ternary`` keys the
result on the step generation that the engines open per train_step / eval_loss (bitnet_dist.step_cache;
megatron's optimizers write weights through ``.data``, which the version counter does not see) and on the
weight's storage and version counter: micro-batches of one step reuse the codes, the next step
recomputes them, and with no generation open nothing is cached.

2-bit format (storage, communication): code c in {-1, 0, 1} is stored as c + 1 in {0, 1, 2}; four
consecutive codes of a row share a byte, the first in the lowest two bits. Rows are padded to a multiple
of four columns with code 0.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from bitnet_dist import step_cache
from bitnet_dist.quant import group_size, segment_sums
from bitnet_dist.switches import flag

from ._common import FastLaunch, int_spec, interpreting, next_pow2, rint

SCALE_EPS = 1e-5


@triton.jit
def _abssum_of_row(Wrow, K, BK: tl.constexpr):
    """sum_k |Wrow[k]| in fp32: BK-wide partial sums over the row, then one tree (shared by both launchers)."""
    acc = tl.zeros([BK], tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        acc += tl.abs(tl.load(Wrow + cols, mask=cols < K, other=0.0).to(tl.float32))
    return tl.sum(acc, axis=0)


@triton.jit
def _row_scale(tot, n, EPS: tl.constexpr):
    """A segment's absmean max(abs-sum / max(count, 1), EPS), IEEE division."""
    return tl.maximum(tl.math.div_rn(tot, tl.maximum(n, 1.0)), EPS)


@triton.jit
def _ternary_of(w, s):
    """RoundClip(w / s, -1, 1) in fp32 (IEEE division, round half to even)."""
    return tl.minimum(tl.maximum(rint(tl.math.div_rn(w, s)), -1.0), 1.0)


@triton.jit
def _segment_stat_of(ABSSUM, SEG, R, HAS_SEG, NS: tl.constexpr, BR: tl.constexpr):
    """(abs-sum, row count) per segment id < NS over rows [0, R): blocks of BR rows in order, each reduced by a
    fixed tree, so the same bits on every run."""
    sid = tl.arange(0, NS)
    acc = tl.zeros([NS], tl.float32)
    cnt = tl.zeros([NS], tl.int32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        m = r < R
        a = tl.load(ABSSUM + r, mask=m, other=0.0)
        if HAS_SEG:
            s = tl.load(SEG + r, mask=m, other=-1).to(tl.int32)
        else:
            s = tl.where(m, 0, -1)
        hit = s[:, None] == sid[None, :]
        acc += tl.sum(tl.where(hit, a[:, None], 0.0), axis=0)
        cnt += tl.sum(hit.to(tl.int32), axis=0)
    return acc, cnt


@triton.jit
def _row_abssum_kernel(W, OUT, K, stride_w, BK: tl.constexpr):
    row = tl.program_id(0)
    tl.store(OUT + row, _abssum_of_row(W + row * stride_w, K, BK))


@triton.jit
def _codes_kernel(W, SCALE, Q, Q8, K, stride_w, BK: tl.constexpr, WRITE_FP8: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = cols < K
    w = tl.load(W + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
    c = _ternary_of(w, tl.load(SCALE + row))
    tl.store(Q + row * K + cols, c.to(tl.int8), mask=m)
    if WRITE_FP8:
        tl.store(Q8 + row * K + cols, c.to(tl.float8e4nv), mask=m)


@triton.jit
def _segment_stat_kernel(ABSSUM, SEG, STAT, R, K, NSEG, HAS_SEG: tl.constexpr, NS: tl.constexpr, BR: tl.constexpr):
    """One program: STAT[0, s] = sum of ABSSUM over the rows of segment s, STAT[1, s] = their count x K (fp32),
    [2, NSEG] row-major (``_segment_stat_of``)."""
    sid = tl.arange(0, NS)
    acc, cnt = _segment_stat_of(ABSSUM, SEG, R, HAS_SEG, NS, BR)
    ms = sid < NSEG
    tl.store(STAT + sid, acc, mask=ms)
    tl.store(STAT + NSEG + sid, (cnt.to(tl.int64) * K).to(tl.float32), mask=ms)


@triton.jit
def _scale_codes_kernel(W, STAT, SEG, SCALE, Q, Q8, K, stride_w, NSEG, HAS_SEG: tl.constexpr, BK: tl.constexpr,
                        WRITE_FP8: tl.constexpr, EPS: tl.constexpr):
    """Row scale max(STAT[0, s] / max(STAT[1, s], 1), EPS) of the row's segment s (written by column block 0) and
    the codes RoundClip(W / scale, -1, 1) as int8 (and FP8 e4m3)."""
    row = tl.program_id(0)
    if HAS_SEG:
        sid = tl.load(SEG + row)
    else:
        sid = 0
    tot = tl.load(STAT + sid)
    n = tl.load(STAT + NSEG + sid)
    s = _row_scale(tot, n, EPS)
    tl.store(SCALE + row, s, mask=tl.program_id(1) == 0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = cols < K
    w = tl.load(W + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
    c = _ternary_of(w, s)
    tl.store(Q + row * K + cols, c.to(tl.int8), mask=m)
    if WRITE_FP8:
        tl.store(Q8 + row * K + cols, c.to(tl.float8e4nv), mask=m)


# ---------------------------------------------------------------------- every weight of a model at once
# The same arithmetic as the three kernels above (the shared helpers), over a batch of weights described by
# tables: weight w's rows are rows [ROW0[w], ROW0[w] + N[w]) of the batch; its elements sit WOFF[w] elements
# from W0 (another weight of the batch: one dtype), its codes QOFF[w] from Q (and Q8OFF[w] from Q8, -1 = no FP8),
# its statistic [2, NSEG[w]] at STOFF[w] of STAT, its segment ids SEGOFF[w] from SEG0 (-1 = one segment), its row
# abs-sums ASOFF[w] from ABSSUM. W_AL / K16: every base and row stride is W_AL elements aligned / every K a
# multiple of 16, the facts the per-weight launches let Triton specialize on (the same load layouts, so the
# same reduction trees and bits).
@triton.jit
def _batch_row(r, WID, ROW0, WN, WK, WSTRIDE, WOFF, W_AL: tl.constexpr, K16: tl.constexpr):
    wi = tl.load(WID + r)
    row = r - tl.load(ROW0 + wi)
    K = tl.load(WK + wi)
    base = tl.load(WOFF + wi) + row * tl.load(WSTRIDE + wi)
    if W_AL > 1:
        base = tl.multiple_of(base, W_AL)
    if K16:
        K = tl.multiple_of(K, 16)
    return wi, row, K, base


@triton.jit
def _batch_abssum_kernel(W0, WID, ROW0, WN, WK, WSTRIDE, WOFF, ASOFF, ABSSUM, R0, BK: tl.constexpr,
                         W_AL: tl.constexpr, K16: tl.constexpr):
    """Rows R0 + program id (the weights launched together share BK)."""
    r = R0 + tl.program_id(0).to(tl.int64)
    wi, row, K, base = _batch_row(r, WID, ROW0, WN, WK, WSTRIDE, WOFF, W_AL, K16)
    tl.store(ABSSUM + tl.load(ASOFF + wi) + row, _abssum_of_row(W0 + base, K, BK))


@triton.jit
def _batch_segstat_kernel(MEMBERS, WN, WK, ASOFF, SEG0, SEGOFF, NSEG, STOFF, ABSSUM, STAT, NS: tl.constexpr,
                          BR: tl.constexpr):
    """Program j: the statistic of weight MEMBERS[j] (the weights launched together share NS and BR)."""
    wi = tl.load(MEMBERS + tl.program_id(0))
    R = tl.load(WN + wi)
    segoff = tl.load(SEGOFF + wi)
    has_seg = segoff >= 0
    acc, cnt = _segment_stat_of(ABSSUM + tl.multiple_of(tl.load(ASOFF + wi), 16),
                                SEG0 + tl.multiple_of(tl.maximum(segoff, 0), 2), R, has_seg, NS, BR)
    nseg = tl.load(NSEG + wi)
    st = STAT + tl.load(STOFF + wi)
    sid = tl.arange(0, NS)
    ms = sid < nseg
    tl.store(st + sid, acc, mask=ms)
    tl.store(st + nseg + sid, (cnt.to(tl.int64) * tl.load(WK + wi)).to(tl.float32), mask=ms)


@triton.jit
def _batch_scale_codes_kernel(W0, WID, ROW0, WN, WK, WSTRIDE, WOFF, SEG0, SEGOFF, NSEG, STOFF, STAT, QOFF, Q8OFF,
                              SCALE, Q, Q8, BK: tl.constexpr, W_AL: tl.constexpr, K16: tl.constexpr,
                              ANY_FP8: tl.constexpr, EPS: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    wi, row, K, base = _batch_row(r, WID, ROW0, WN, WK, WSTRIDE, WOFF, W_AL, K16)
    segoff = tl.load(SEGOFF + wi)
    has_seg = segoff >= 0  # else one segment: a valid address is read (row 0 of SEG0) and not used
    sid = tl.where(has_seg, tl.load(SEG0 + tl.maximum(segoff, 0) + tl.where(has_seg, row, 0)), 0)
    st = STAT + tl.load(STOFF + wi)
    s = _row_scale(tl.load(st + sid), tl.load(st + tl.load(NSEG + wi) + sid), EPS)
    tl.store(SCALE + r, s)
    qb = tl.load(QOFF + wi) + row * K
    q8off = tl.load(Q8OFF + wi)
    q8b = q8off + row * K
    if K16:  # every K a multiple of 16, so every code offset too (16-byte vector stores)
        qb = tl.multiple_of(qb, 16)
        q8b = tl.multiple_of(q8b, 16)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        m = cols < K
        c = _ternary_of(tl.load(W0 + base + cols, mask=m, other=0.0).to(tl.float32), s)
        tl.store(Q + qb + cols, c.to(tl.int8), mask=m)
        if ANY_FP8:
            if q8off >= 0:
                tl.store(Q8 + q8b + cols, c.to(tl.float8e4nv), mask=m)


@triton.jit
def _dequant_kernel(Q, SCALE, OUT, K, BK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = cols < K
    c = tl.load(Q + row * K + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * K + cols, (c * tl.load(SCALE + row)).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _pack_kernel(Q, P, K, KP, BP: tl.constexpr):
    row = tl.program_id(0)
    j = tl.program_id(1) * BP + tl.arange(0, BP)
    acc = tl.zeros([BP], tl.int32)
    for i in tl.static_range(4):
        k = 4 * j + i
        c = tl.load(Q + row * K + k, mask=(k < K) & (j < KP), other=0).to(tl.int32)
        acc = acc | ((c + 1) << (2 * i))
    tl.store(P + row * KP + j, acc.to(tl.uint8), mask=j < KP)


@triton.jit
def _unpack_kernel(P, Q, K, KP, BP: tl.constexpr):
    row = tl.program_id(0)
    j = tl.program_id(1) * BP + tl.arange(0, BP)
    b = tl.load(P + row * KP + j, mask=j < KP, other=0).to(tl.int32)
    for i in tl.static_range(4):
        k = 4 * j + i
        c = ((b >> (2 * i)) & 3) - 1
        tl.store(Q + row * K + k, c.to(tl.int8), mask=(k < K) & (j < KP))


_ABSSUM, _CODES, _DEQUANT, _SEGSTAT, _SCALE_CODES = (
    FastLaunch(k) for k in (_row_abssum_kernel, _codes_kernel, _dequant_kernel, _segment_stat_kernel,
                            _scale_codes_kernel))
_B_ABSSUM, _B_SEGSTAT, _B_SCALE_CODES = (
    FastLaunch(k) for k in (_batch_abssum_kernel, _batch_segstat_kernel, _batch_scale_codes_kernel))
FUSED_WEIGHT_QUANT = flag("BITNET_FUSED_WEIGHT_QUANT")


def weight_scales(w: torch.Tensor, segments: Optional[torch.Tensor] = None, num_segments: Optional[int] = None,
                  group=None) -> torch.Tensor:
    """Per-row fp32 absmean scale [rows] of w [rows, K]; ``segments`` [rows] ids (None = one segment);
    the [2, segments] (abs-sum, count) statistic is all-reduced over ``group``."""
    rows, K = w.shape
    abssum = _row_abssums(w)
    if segments is None:
        # No host round trip in the step: the count is filled in by a kernel, not copied from the host.
        stat = torch.empty((2, 1), device=w.device, dtype=torch.float32)
        torch.sum(abssum, dim=0, keepdim=True, out=stat[0])
        stat[1].fill_(float(rows * K))
        seg = torch.zeros(rows, dtype=torch.long, device=w.device)
    else:
        n = num_segments if num_segments is not None else _num_segments(segments)
        stat = torch.stack([segment_sums(abssum, segments, n),  # fixed order (index_add_ is atomic on CUDA)
                            segment_sums(torch.full((rows,), float(K), device=w.device), segments, n)])
        seg = segments
    if group_size(group) > 1:
        dist.all_reduce(stat, op=dist.ReduceOp.SUM, group=group)
    alpha = (stat[0] / stat[1].clamp_min(1.0)).clamp_min(SCALE_EPS)
    return alpha[seg].contiguous()


def ternary_codes(w: torch.Tensor, row_scale: torch.Tensor, *, fp8: bool = False):
    """(int8 codes [rows, K], float8_e4m3fn codes or None); w's last dim contiguous."""
    rows, K = w.shape
    q = torch.empty((rows, K), device=w.device, dtype=torch.int8)
    q8 = torch.empty((rows, K), device=w.device, dtype=torch.float8_e4m3fn) if fp8 else q
    if rows and K:
        BK = min(2048, max(16, next_pow2(K)))
        _CODES[(rows, triton.cdiv(K, BK))](w, row_scale, q, q8, K, w.stride(0), BK=BK, WRITE_FP8=fp8)
    return q, (q8 if fp8 else None)


def pack2bit(codes: torch.Tensor) -> torch.Tensor:
    """int8 ternary codes [rows, K] -> uint8 [rows, ceil(K / 4)]."""
    codes = codes.contiguous()
    rows, K = codes.shape
    KP = (K + 3) // 4
    p = torch.empty((rows, KP), device=codes.device, dtype=torch.uint8)
    if rows and KP:
        BP = min(1024, max(16, next_pow2(KP)))
        _pack_kernel[(rows, triton.cdiv(KP, BP))](codes, p, K, KP, BP=BP)
    return p


def unpack2bit(packed: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [rows, ceil(K / 4)] -> int8 ternary codes [rows, K]."""
    packed = packed.contiguous()
    rows, KP = packed.shape
    if KP != (K + 3) // 4:
        raise ValueError(f"packed width {KP} does not hold K={K} columns (needs {(K + 3) // 4})")
    q = torch.empty((rows, K), device=packed.device, dtype=torch.int8)
    if rows and KP:
        BP = min(1024, max(16, next_pow2(KP)))
        _unpack_kernel[(rows, triton.cdiv(KP, BP))](packed, q, K, KP, BP=BP)
    return q


@dataclass
class TernaryWeight:
    """One optimizer step's quantized weight [N, K]: int8 codes, fp32 per-row scale, lazily derived
    operands for the GEMMs (FP8 codes, their transpose, a dequantized copy for bf16 backward)."""

    codes: torch.Tensor
    scale: torch.Tensor
    fp8: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)

    def fp8_t(self) -> torch.Tensor:
        """FP8 codes transposed [K, N] contiguous (the column-major B operand of grad_x = dy @ W)."""
        if "fp8_t" not in self.extra:
            src = self.fp8 if self.fp8 is not None else self.codes.float().to(torch.float8_e4m3fn)
            self.extra["fp8_t"] = src.t().contiguous()
        return self.extra["fp8_t"]

    def fp8_codes(self) -> torch.Tensor:
        if self.fp8 is None:
            self.fp8 = self.codes.float().to(torch.float8_e4m3fn)
        return self.fp8

    def fp8_operands(self) -> tuple:
        """(FP8 codes as the column-major B operand [K, N], scale as fp32 [1, N]) of the forward's
        ``gemm.fp8_gemm_t``: views made once per step instead of on every micro-batch's call."""
        ops = self.extra.get("fp8_ops")
        if ops is None:
            ops = self.extra["fp8_ops"] = (self.fp8_codes().t(), self.scale.reshape(1, -1).float())
        return ops

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """codes * scale [N, K] in ``dtype`` (the reference's fake-quantized weight). Made afresh on each
        call (one pass, 3 B/weight) rather than cached: a cached bf16 copy would cost as much memory as
        the weight itself for the whole step."""
        return dequantize_rows(self.codes, self.scale, dtype)


def dequantize_rows(codes: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (int8 or FP8) [R, K] contiguous * row_scale [R] -> ``dtype`` [R, K], fp32 product, one rounding."""
    codes = codes.contiguous()
    rows, K = codes.shape
    out = torch.empty((rows, K), device=codes.device, dtype=dtype)
    if rows and K:
        BK = min(2048, max(16, next_pow2(K)))
        # launch key: every argument's specialization (out is a fresh allocation: aligned) and the constexpr
        _DEQUANT.launch_keyed((codes.device.index, codes.dtype, row_scale.dtype, dtype, K,
                               codes.data_ptr() % 16 == 0, row_scale.data_ptr() % 16 == 0),
                              (rows, -(-K // BK), 1), (codes, row_scale, out, K), {"BK": BK})
    return out


def quantize_weight(w: torch.Tensor, segments: Optional[torch.Tensor] = None, num_segments: Optional[int] = None,
                    group=None, *, fp8: bool = False) -> TernaryWeight:
    w = w.detach()
    if w.stride(-1) != 1:
        w = w.contiguous()
    if not FUSED_WEIGHT_QUANT:
        scale = weight_scales(w, segments, num_segments, group)
        q, q8 = ternary_codes(w, scale, fp8=fp8)
        return TernaryWeight(q, scale, q8)
    rows, K = w.shape
    dev = w.device
    has_seg = segments is not None
    nseg = _num_segments(segments) if has_seg and num_segments is None else (num_segments if has_seg else 1)
    seg = segments if has_seg else w  # not read without segments
    abssum = _row_abssums(w)
    stat = torch.empty((2, nseg), device=dev, dtype=torch.float32)
    NS, BR = _stat_block(rows, nseg)
    _SEGSTAT.launch_keyed((dev.index, "stat", has_seg, seg.dtype, int_spec(rows), int_spec(K), int_spec(nseg),
                           seg.data_ptr() % 16 == 0, NS, BR),
                          (1, 1, 1), (abssum, seg, stat, rows, K, nseg), {"HAS_SEG": has_seg, "NS": NS, "BR": BR})
    if group_size(group) > 1:
        dist.all_reduce(stat, op=dist.ReduceOp.SUM, group=group)
    scale = torch.empty(rows, device=dev, dtype=torch.float32)
    q = torch.empty((rows, K), device=dev, dtype=torch.int8)
    q8 = torch.empty((rows, K), device=dev, dtype=torch.float8_e4m3fn) if fp8 else q
    if rows and K:
        BK = min(2048, max(16, next_pow2(K)))
        _SCALE_CODES.launch_keyed(
            (dev.index, w.dtype, seg.dtype, int_spec(K), int_spec(w.stride(0)), int_spec(nseg), w.data_ptr() % 16 == 0,
             seg.data_ptr() % 16 == 0, has_seg, BK, fp8),
            (rows, triton.cdiv(K, BK), 1), (w, stat, seg, scale, q, q8, K, w.stride(0), nseg),
            {"HAS_SEG": has_seg, "BK": BK, "WRITE_FP8": fp8, "EPS": SCALE_EPS})
    return TernaryWeight(q, scale, q8 if fp8 else None)


def _abssum_block(K: int) -> int:
    return min(1024, max(16, next_pow2(K)))


def _stat_block(rows: int, nseg: int) -> tuple:
    """(NS, BR) of the segment-statistic program: segment slots, rows per block."""
    NS = max(2, next_pow2(nseg))
    return NS, max(16, min(1024, 4096 // NS, next_pow2(rows)))


def _row_abssums(w: torch.Tensor) -> torch.Tensor:
    """sum_k |w[r, k]| in fp32 [rows] (w's last dim contiguous)."""
    rows, K = w.shape
    abssum = torch.empty(rows, device=w.device, dtype=torch.float32)
    if rows:
        BK = _abssum_block(K)
        _ABSSUM.launch_keyed((w.device.index, w.dtype, int_spec(K), int_spec(w.stride(0)), w.data_ptr() % 16 == 0, BK),
                             (rows, 1, 1), (w, abssum, K, w.stride(0)), {"BK": BK})
    return abssum


_CACHE_ATTR = "_bitnet_ternary_cache"
_NSEG_ATTR = "_bitnet_num_segments"


def _num_segments(segments: torch.Tensor) -> int:
    """max(segments) + 1, read from the device once per segments tensor (a host sync) and then kept on the tensor
    itself with its version counter, so the per-step weight quantization does not stall the launch queue. (A
    process-wide cache keyed on the storage address served a stale count to a new tensor at a freed one's address,
    and the fused kernel would then read the statistic out of bounds.)"""
    hit = getattr(segments, _NSEG_ATTR, None)
    if hit is not None and hit[0] == segments._version:
        return hit[1]
    n = int(segments.max().item()) + 1 if segments.numel() else 1
    try:
        setattr(segments, _NSEG_ATTR, (segments._version, n))
    except (AttributeError, RuntimeError):  # no attributes on this tensor: recomputed per call, still correct
        pass
    return n


def _cache_key(generation, weight: torch.Tensor, segments: Optional[torch.Tensor], group) -> tuple:
    seg_key = None if segments is None else (segments.data_ptr(), segments._version, segments.numel())
    return (generation, weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, seg_key, id(group))


def cached_ternary(weight: torch.Tensor, segments: Optional[torch.Tensor] = None, group=None,
                   *, fp8: bool = False) -> TernaryWeight:
    """``quantize_weight`` once per step generation and weight version: the key is the generation
    (bitnet_dist.step_cache), the storage pointer, the version counter, shape, dtype, the segments and the
    group, so micro-batches of one step reuse the codes. No open generation: no caching. The cache lives
    on the Parameter itself (freed with it)."""
    generation = step_cache.current()
    key = _cache_key(generation, weight, segments, group)
    hit = getattr(weight, _CACHE_ATTR, None)
    if hit is None or hit[0] != key:
        # the first weight of a batch (``WeightBatch``) asked for in this generation quantizes the whole batch
        batch = getattr(weight, _BATCH_ATTR, None)
        if batch is not None and generation is not None and batch.run(generation):
            hit = getattr(weight, _CACHE_ATTR, None)
    if hit is not None and hit[0] == key:
        tw = hit[1]
        if fp8:
            tw.fp8_codes()
        return tw
    num_segments = None if segments is None else _num_segments(segments)
    with torch.no_grad():
        tw = quantize_weight(weight, segments, num_segments, group, fp8=fp8)
    if generation is None:  # no step open (outside the engines): never reuse
        return tw
    try:
        setattr(weight, _CACHE_ATTR, (key, tw))
    except (AttributeError, RuntimeError):  # a non-leaf view: no cache, still correct
        pass
    return tw


# ------------------------------------------------------------------------------ one pass over all weights
BATCHED_WEIGHT_QUANT = flag("BITNET_BATCHED_WEIGHT_QUANT")
_BATCH_ATTR = "_bitnet_quant_batch"


@dataclass
class WeightMember:
    """One weight of a ``WeightBatch``: the Parameter, its segment ids (None = one segment), the TP group its
    statistic is all-reduced over, and whether the layer's forward will want FP8 codes (asked at every step:
    the activation bits change during a run)."""

    weight: torch.Tensor
    segments: Optional[torch.Tensor] = None
    group: object = None
    fp8: Callable[[], bool] = lambda: False


class _Plan:
    """Device tables of one set of members (one device, dtype and TP group), rebuilt when a weight moves or a
    member's FP8 need changes (host-side comparison of ``sig``)."""

    def __init__(self, members: list, fp8: list, sig: tuple):
        """members: this set's WeightMembers (strong references for the build only: the plan keeps none, see
        ``WeightBatch``)."""
        self.sig = sig
        dev, el = members[0].weight.device, members[0].weight.element_size()
        # members in order of the abs-sum kernel's block (one launch per block size, contiguous rows)
        self.order = sorted(range(len(members)), key=lambda i: _abssum_block(members[i].weight.shape[1]))
        members = [members[i] for i in self.order]
        self.fp8 = [fp8[i] for i in self.order]
        # weights are addressed from the first (sorted) one; segment ids from the lowest-addressed ids tensor
        # (offsets >= 0, -1 = one segment): its position in the sorted members, or -1
        with_seg = [i for i, m in enumerate(members) if m.segments is not None]
        self.seg0_pos = min(with_seg, key=lambda i: members[i].segments.data_ptr(), default=-1)
        w0 = members[0].weight
        seg0 = members[self.seg0_pos].segments if self.seg0_pos >= 0 else None
        rows, ks, strides, woff, row0, asoff, segoff, nseg, stoff, qoff, q8off = ([] for _ in range(11))
        r = a = st = q = q8 = 0
        for m, f in zip(members, self.fp8):
            w = m.weight
            N, K = w.shape
            rows.append(N), ks.append(K), strides.append(w.stride(0)), row0.append(r), asoff.append(a)
            woff.append((w.data_ptr() - w0.data_ptr()) // el)
            segoff.append(-1 if m.segments is None else (m.segments.data_ptr() - seg0.data_ptr()) // 8)
            n = 1 if m.segments is None else _num_segments(m.segments)
            nseg.append(n), stoff.append(st), qoff.append(q), q8off.append(q8 if f else -1)
            r, a, st, q = r + N, a + -(-N // 16) * 16, st + 2 * n, q + N * K
            q8 += N * K if f else 0
        self.rows, self.row0, self.sizes = rows, row0, (r, a, st, q, q8)
        self.ks, self.stoff, self.qoff, self.q8off, self.nseg = ks, stoff, qoff, q8off, nseg

        def i64(v):
            return torch.tensor(v, dtype=torch.int64).to(dev)

        self.t = dict(WN=i64(rows), WK=i64(ks), WSTRIDE=i64(strides), WOFF=i64(woff), ROW0=i64(row0),
                      ASOFF=i64(asoff), SEGOFF=i64(segoff), NSEG=i64(nseg), STOFF=i64(stoff), QOFF=i64(qoff),
                      Q8OFF=i64(q8off))
        self.t["WID"] = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32),
                                                torch.tensor(rows)).to(dev)
        aligned = all(m.weight.data_ptr() % 16 == 0 and (m.weight.stride(0) * el) % 16 == 0 for m in members)
        self.w_al = 16 // el if aligned and 16 % el == 0 else 1
        self.k16 = all(k % 16 == 0 for k in ks)
        # abs-sum launches: (first row, rows, BK); statistic launches: (NS, BR) -> member indices
        self.abssum_runs, cur = [], None
        for i, K in enumerate(ks):
            bk = _abssum_block(K)
            if cur is not None and cur[2] == bk:
                cur[1] += rows[i]
            else:
                cur = [row0[i], rows[i], bk]
                self.abssum_runs.append(cur)
        by_stat: dict = {}
        for i in range(len(rows)):
            by_stat.setdefault(_stat_block(rows[i], nseg[i]), []).append(i)
        self.stat_runs = [(ns, br, torch.tensor(ix, dtype=torch.int32).to(dev)) for (ns, br), ix in by_stat.items()]
        self.codes_bk = min(2048, max(16, next_pow2(max(ks))))


class WeightBatch:
    """Quantizes a model's ternary weights together, once per step generation, in a handful of launches: the
    row abs-sums (one launch per abs-sum block size), the segment statistics (one per statistic block shape),
    one all-reduce of all statistics per TP group, and the scales and codes (one launch). The results are the
    per-weight ``quantize_weight`` values (the same kernel arithmetic and, with the same specialization facts,
    the same reduction trees) in one buffer per kind, handed to each weight's ``cached_ternary`` entry.

    Why: the first micro-batch of an eager step quantized every weight just before its GEMM, three launches
    each (216 for the 1.3B model), and the host's time for those launches left the GPU idle
    (docs/kernels.md "Per-step weight quantization"). Attached to the weights by ``attach``; the first
    ``cached_ternary`` call of a generation on any member runs it (inside the step, so a captured CUDA graph
    holds it too). Members it cannot take (another dtype mix, a non-contiguous row, int32 segment ids) and
    calls that miss its entries fall back to the per-weight path. Not for weights that are not materialized
    for the whole step (DeepSpeed ZeRO-3, megatron's overlapped parameter all-gather): the engines do not
    attach it there. ``BITNET_BATCHED_WEIGHT_QUANT=0`` turns it off.

    The batch holds its weights by weak reference and its plans hold no tensor of theirs: each weight refers to
    the batch (an attribute), so anything the batch held strongly would close a cycle through the model. With
    megatron DDP (which keeps every parameter's AccumulateGrad node, with a hook) such a cycle is not collected:
    the first version's FP8 callables held their layers, and every deleted engine (weights, gradients, optimizer
    state, ~25 GiB at 1.3B) stayed allocated (H100; test_megatron_gpu.py has the control). A member's ``fp8``
    callable must not hold its weight or layer strongly either (layers.batch_weight_quant uses weak references)."""

    def __init__(self, members: Sequence[WeightMember]):
        self._refs = [(weakref.ref(m.weight), m.segments, m.group, m.fp8) for m in members]
        self.generation = None
        self.runs = 0
        self._plans: dict = {}

    @property
    def members(self) -> list:
        """The members whose weights are alive (strong references: do not keep the list)."""
        return [WeightMember(w, seg, group, fp8) for ref, seg, group, fp8 in self._refs if (w := ref()) is not None]

    @classmethod
    def attach(cls, members: Sequence[WeightMember]) -> Optional["WeightBatch"]:
        ok = [m for m in members if cls._takes(m)]
        if not ok or not (BATCHED_WEIGHT_QUANT and FUSED_WEIGHT_QUANT):
            return None
        batch = cls(ok)
        for m in ok:
            setattr(m.weight, _BATCH_ATTR, batch)
        return batch

    @staticmethod
    def detach(weights) -> None:
        for w in weights:
            if getattr(w, _BATCH_ATTR, None) is not None:
                delattr(w, _BATCH_ATTR)

    @staticmethod
    def _takes(m: WeightMember) -> bool:
        w = m.weight
        return (w.dim() == 2 and w.numel() > 0 and w.stride(1) == 1 and (w.is_cuda or interpreting())
                and (m.segments is None or (m.segments.dtype == torch.int64 and m.segments.is_contiguous()
                                            and m.segments.numel() == w.shape[0])))

    def run(self, generation) -> bool:
        """Quantize every member for ``generation`` (once; False if it already ran for it, or cannot run)."""
        if generation is None or generation == self.generation:
            return False
        self.generation = generation
        sets: dict = {}
        for m in self.members:  # strong references for this call only
            if self._takes(m):
                sets.setdefault((m.weight.device, m.weight.dtype, id(m.group)), []).append(m)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        ran = False
        with torch.no_grad():
            for key, ms in sets.items():
                fp8 = [bool(m.fp8()) for m in ms]
                sig = tuple((m.weight.data_ptr(), tuple(m.weight.shape), m.weight.stride(0),
                             None if m.segments is None else (m.segments.data_ptr(), m.segments.numel()))
                            for m in ms) + (tuple(fp8),)
                plan = self._plans.get(key)
                if plan is None or plan.sig != sig:
                    if capturing:  # tables are built outside a capture; this set goes the per-weight way
                        continue
                    plan = self._plans[key] = _Plan(ms, fp8, sig)
                self._quantize(plan, [ms[i] for i in plan.order], generation)
                ran = True
        self.runs += ran
        return ran

    @staticmethod
    def _quantize(p: _Plan, members: list, generation) -> None:
        """members: the set's members in the plan's order."""
        for m in members:  # the last step's codes go first: no second copy of every weight's codes at the peak
            if getattr(m.weight, _CACHE_ATTR, None) is not None:
                setattr(m.weight, _CACHE_ATTR, None)
        w0 = members[0].weight
        dev = w0.device
        R, A, ST, QN, Q8N = p.sizes
        t = p.t
        abssum = torch.empty(A, device=dev, dtype=torch.float32)
        stat = torch.empty(ST, device=dev, dtype=torch.float32)
        scale = torch.empty(R, device=dev, dtype=torch.float32)
        q = torch.empty(QN, device=dev, dtype=torch.int8)
        q8 = torch.empty(Q8N, device=dev, dtype=torch.float8_e4m3fn) if Q8N else q
        for r0, n, bk in p.abssum_runs:
            _B_ABSSUM[(n,)](w0, t["WID"], t["ROW0"], t["WN"], t["WK"], t["WSTRIDE"], t["WOFF"], t["ASOFF"],
                            abssum, r0, BK=bk, W_AL=p.w_al, K16=p.k16)
        seg0 = members[p.seg0_pos].segments if p.seg0_pos >= 0 else t["SEGOFF"]  # not read without segments
        for ns, br, ix in p.stat_runs:
            _B_SEGSTAT[(ix.numel(),)](ix, t["WN"], t["WK"], t["ASOFF"], seg0, t["SEGOFF"], t["NSEG"], t["STOFF"],
                                      abssum, stat, NS=ns, BR=br)
        group = members[0].group
        if group_size(group) > 1:
            dist.all_reduce(stat, op=dist.ReduceOp.SUM, group=group)
        _B_SCALE_CODES[(R,)](w0, t["WID"], t["ROW0"], t["WN"], t["WK"], t["WSTRIDE"], t["WOFF"], seg0,
                             t["SEGOFF"], t["NSEG"], t["STOFF"], stat, t["QOFF"], t["Q8OFF"], scale, q, q8,
                             BK=p.codes_bk, W_AL=p.w_al, K16=p.k16, ANY_FP8=bool(Q8N), EPS=SCALE_EPS)
        for i, m in enumerate(members):
            N, K = p.rows[i], p.ks[i]
            codes = q[p.qoff[i]:p.qoff[i] + N * K].view(N, K)
            c8 = q8[p.q8off[i]:p.q8off[i] + N * K].view(N, K) if p.q8off[i] >= 0 else None
            tw = TernaryWeight(codes, scale[p.row0[i]:p.row0[i] + N], c8)
            setattr(m.weight, _CACHE_ATTR, (_cache_key(generation, m.weight, m.segments, group), tw))


# ------------------------------------------------------------------------------- torch reference twin
def quantize_weight_reference(w: torch.Tensor, segments: Optional[torch.Tensor] = None):
    """(int8 codes, fp32 per-row scale) in plain torch, single device, computed independently of the kernels and of
    ``bitnet_dist.quant``: each segment's mean |W| in float64 over a boolean row mask (the formula), rounded once to
    fp32. Its scale can differ from an fp32 sum's in the last bit, so a code can differ where |W| / alpha is within
    rounding of the 0.5 tie (the tests allow exactly that)."""
    a = w.detach().double().abs()
    if segments is None:
        alpha64 = a.mean().expand(w.shape[0])
    else:
        segments = segments.to(w.device)
        alpha64 = torch.empty(w.shape[0], dtype=torch.float64, device=w.device)
        for k in torch.unique(segments).tolist():
            rows = segments == k
            alpha64[rows] = a[rows].mean()
    alpha = alpha64.float().clamp_min(SCALE_EPS)
    codes = torch.round(w.float() / alpha[:, None]).clamp_(-1, 1).to(torch.int8)
    return codes, alpha


def pack2bit_reference(codes: torch.Tensor) -> torch.Tensor:
    rows, K = codes.shape
    pad = (-K) % 4
    v = torch.nn.functional.pad(codes.to(torch.int32) + 1, (0, pad), value=1).view(rows, -1, 4)
    return (v[..., 0] | (v[..., 1] << 2) | (v[..., 2] << 4) | (v[..., 3] << 6)).to(torch.uint8)
