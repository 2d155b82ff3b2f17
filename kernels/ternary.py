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

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from bitnet_dist.quant import segment_sums

from ._common import FastLaunch, int_spec, next_pow2, rint

SCALE_EPS = 1e-5


@triton.jit
def _row_abssum_kernel(W, OUT, K, stride_w, BK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([BK], tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        acc += tl.abs(tl.load(W + row * stride_w + cols, mask=cols < K, other=0.0).to(tl.float32))
    tl.store(OUT + row, tl.sum(acc, axis=0))


@triton.jit
def _codes_kernel(W, SCALE, Q, Q8, K, stride_w, BK: tl.constexpr, WRITE_FP8: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = cols < K
    w = tl.load(W + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
    s = tl.load(SCALE + row)
    c = tl.minimum(tl.maximum(rint(tl.math.div_rn(w, s)), -1.0), 1.0)
    tl.store(Q + row * K + cols, c.to(tl.int8), mask=m)
    if WRITE_FP8:
        tl.store(Q8 + row * K + cols, c.to(tl.float8e4nv), mask=m)


@triton.jit
def _segment_stat_kernel(ABSSUM, SEG, STAT, R, K, NSEG, HAS_SEG: tl.constexpr, NS: tl.constexpr, BR: tl.constexpr):
    """One program: STAT[0, s] = sum of ABSSUM over the rows of segment s, STAT[1, s] = their count x K (fp32),
    [2, NSEG] row-major; blocks of BR rows in order, each reduced by a fixed tree: the same bits on every run."""
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
    s = tl.maximum(tl.math.div_rn(tot, tl.maximum(n, 1.0)), EPS)
    tl.store(SCALE + row, s, mask=tl.program_id(1) == 0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = cols < K
    w = tl.load(W + row * stride_w + cols, mask=m, other=0.0).to(tl.float32)
    c = tl.minimum(tl.maximum(rint(tl.math.div_rn(w, s)), -1.0), 1.0)
    tl.store(Q + row * K + cols, c.to(tl.int8), mask=m)
    if WRITE_FP8:
        tl.store(Q8 + row * K + cols, c.to(tl.float8e4nv), mask=m)


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
FUSED_WEIGHT_QUANT = os.environ.get("BITNET_FUSED_WEIGHT_QUANT", "1") not in ("", "0")


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


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
    if _group_size(group) > 1:
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
    NS = max(2, next_pow2(nseg))
    BR = max(16, min(1024, 4096 // NS, next_pow2(rows)))
    _SEGSTAT.launch_keyed((dev.index, "stat", has_seg, seg.dtype, int_spec(rows), int_spec(K), int_spec(nseg),
                           seg.data_ptr() % 16 == 0, NS, BR),
                          (1, 1, 1), (abssum, seg, stat, rows, K, nseg), {"HAS_SEG": has_seg, "NS": NS, "BR": BR})
    if _group_size(group) > 1:
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


def _row_abssums(w: torch.Tensor) -> torch.Tensor:
    """sum_k |w[r, k]| in fp32 [rows] (w's last dim contiguous)."""
    rows, K = w.shape
    abssum = torch.empty(rows, device=w.device, dtype=torch.float32)
    if rows:
        BK = min(1024, max(16, next_pow2(K)))
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


def cached_ternary(weight: torch.Tensor, segments: Optional[torch.Tensor] = None, group=None,
                   *, fp8: bool = False) -> TernaryWeight:
    """``quantize_weight`` once per step generation and weight version: the key is the generation
    (bitnet_dist.step_cache), the storage pointer, the version counter, shape, dtype, the segments and the
    group, so micro-batches of one step reuse the codes. No open generation: no caching. The cache lives
    on the Parameter itself (freed with it)."""
    from bitnet_dist import step_cache

    generation = step_cache.current()
    seg_key = None if segments is None else (segments.data_ptr(), segments._version, segments.numel())
    key = (generation, weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, seg_key, id(group))
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
