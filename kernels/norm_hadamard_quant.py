"""Fused RMSNorm -> block Hadamard -> per-token quantization (forward) and its backward: the host side.

The kernels live by family in ``nhq_chunked`` (any width, chunked rows), ``nhq_flat`` (one tile per row,
tensor-core Hadamard) and ``nhq_shuffle`` (warp-shuffle Hadamard); this module picks a family and a launch
configuration per shape, caches launch plans, and holds the public API and the torch reference.

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
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import triton

# One definition of the quantizers' constants: the reference numerics (bitnet_dist.quant).
from bitnet_dist.quant import QRANGE, SCALE_EPS, SQRT7, group_size
from bitnet_dist.switches import flag

from ._common import (
    FastLaunch,
    default_prec,
    device_capability,
    int_spec,
    interpreting,
    next_pow2,
    num_sms,
)
from .nhq_chunked import _bwd_kernel, _fwd_kernel
from .nhq_configs import (
    BWD_FLAT_MIN_FEATURES,
    FLAT_MAX_FEATURES,
    _valid,
    flat_config,
    glu_shuffle_bwd_config,
    glu_shuffle_config,
    launch_config,
    shuffle_bwd_config,
    shuffle_config,
    shuffle_vec,
)
from .nhq_flat import _bwd_flat_kernel, _fwd_flat_kernel
from .nhq_shuffle import _bwd_shfl_kernel, _fwd_shfl_kernel
from .swiglu import swiglu, swiglu_backward

# ---------------------------------------------------------------------------------------- launchers
_FWD, _FWD_FLAT = FastLaunch(_fwd_kernel), FastLaunch(_fwd_flat_kernel)
_BWD, _BWD_FLAT = FastLaunch(_bwd_kernel), FastLaunch(_bwd_flat_kernel)
_FWD_SHFL, _BWD_SHFL = FastLaunch(_fwd_shfl_kernel), FastLaunch(_bwd_shfl_kernel)


def _use_flat(config, D: int, hb: int, *, min_features: int = 0) -> bool:
    if config is not None:
        return config[0] == "flat"
    return hb > 1 and min_features < D <= FLAT_MAX_FEATURES


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
    # HMODE 2 of the flat kernels (no transform) only measures the transform's cost: not a product path
    if bm & (bm - 1) or bm * nb < 16 or hmode not in (0, 1, 3, 4):
        raise ValueError(f"flat launch config {config}: BM must be a power of two with BM * blocks >= 16, "
                         f"HMODE 0 (dense block product), 1 (two-stage, transposed), 3 (two-stage, batched left product) "
                         f"or 4 (two-stage, left product first)")
    hm_dtype = torch.bfloat16 if prec == 2 else torch.float32
    hm = hadamard_matrix(hb, hbd, hm_dtype, device) if hmode == 0 else torch.empty(1, device=device)
    return bm, warps, hmode, per_sm, hbd, nb, hm, bool(prefetch)


def _check(x2: torch.Tensor, hadamard_block: int, act_bits: int) -> None:
    if act_bits not in QRANGE:
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
# decisions read (shapes, strides, pointer alignment, dtypes, options, the module switches, SELF_CHECK included,
# and the identity of the one-time-check caches, so a test that swaps one out gets the checks again); the launch
# key adds what varies per call and that Triton specializes on (the token count's class, the alignment of
# per-token vectors).
# BITNET_LAUNCH_PLANS=0 turns them off (A/B measurements).
_PLANS: dict = {}
PLANS_ON = flag("BITNET_LAUNCH_PLANS")


def _plan_state() -> tuple:
    return (SHUFFLE_FWD, GLU_FOLD, SELF_CHECK, id(_SHFL_DEFAULT), id(_SHFL_BWD_DEFAULT), id(_GLU_CHECKED),
            id(_CAP_SPILLED))


def _fwd_plan_key(x2, norm_weight, act_bits, hadamard_block, eps, full_dim, tp_group, fp8_codes, glu):
    D = x2.shape[1] // 2 if glu else x2.shape[1]
    reduce_tp = full_dim is not None and full_dim != D and group_size(tp_group) > 1
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
    reduce_tp = full_dim is not None and full_dim != D and group_size(tp_group) > 1
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
    reduce_tp = group_size(tp_group) > 1 and full != D
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
# off): the warp-shuffle kernels (H100 sweeps, docs/kernels.md), also for layers without the Hadamard (BitLinear:
# QKV / fc1, BitNet v1): the same row-wise kernels with no butterflies (HB = 1).
SHUFFLE_FWD = flag("BITNET_SHUFFLE_HADAMARD")


# The packed-register forward (``_fwd_shfl_kernel`` PACKED: bf16x2 and int8x4 PTX) on sm_90 and newer;
# BITNET_PACKED_PTX=0 turns it off. The interpreter runs the same kernel structure with element-wise helpers.
_PACKED_PTX = flag("BITNET_PACKED_PTX")


PACKED_ALL = 5  # bit 1: bf16 pairs (unpack, norm product, rounding of u); bit 4: int8 codes four per register


def packed_default(device: torch.device) -> int:
    return PACKED_ALL if _PACKED_PTX and device.type == "cuda" and device_capability(device) >= (9, 0) else 0


def shuffle_maxnreg(bm: int, C: int, warps: int, elem_bytes: int = 2, hadamard: bool = True) -> Optional[int]:
    """Register cap for the warp-shuffle forward on 16-bit activations, or None (ptxas decides). Measured on the
    H100 with Triton 3.6 (three runs each):
    * whole rows of 16384 features on 8 warps took 128 registers per thread, so two programs (16 warps) fitted on
      an SM; capped at 80 (no spills), three fit (24 warps): 74 -> 78-80% (INT8) and 71 -> 77-78% (INT4) of copy
      at 8192 tokens, 76 -> 81-82% and 73 -> 79-81% at 16384 tokens. 76 spilled, 84 / 88 were slower;
    * 2048 features on 2 warps: ptxas took 56 registers; allowed 64 it schedules differently (at most 16 programs
      per SM instead of 18), +0.6 to +2.8 points in each of three runs.
    Elsewhere a cap spilled (8192 features) or was slower (4096). fp32 activations hold twice the registers: no
    cap. Rows without the Hadamard (``hadamard=False``: QKV / fc1 inputs) were not measured under a cap (and
    their kernel, with other live ranges, spills under one in the GPU tests): no cap.
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
        except Exception:
            _CUDA_OPTIONS = frozenset()
    return _CUDA_OPTIONS


_CUDA_OPTIONS = None
_SHFL_MAXNREG = flag("BITNET_SHFL_MAXNREG")


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
# BITNET_KERNEL_SELF_CHECK=1: each warp-shuffle (and SwiGLU-folded) configuration is compared with the tensor-core
# kernels on first use and a mismatch raises; off (default), the kernels run unchecked (the kernel tests compare
# every family with the torch reference).
SELF_CHECK = flag("BITNET_KERNEL_SELF_CHECK")


def _shuffle_verified(x2, g, config, *, act_bits, hb, has_norm, eps, fp8_codes) -> bool:
    """Once per configuration: the warp-shuffle kernel against the tensor-core flat kernel on random rows of
    the same width (BITNET_KERNEL_SELF_CHECK). A layout other than the one ``fwht_shuffle`` assumes pairs the wrong
    features and changes almost every code, so a mismatch above 1e-3 (or scales off beyond float rounding on over
    1% of tokens) raises RuntimeError, naming the switch that selects the tensor-core kernels. Returns True."""
    key = (x2.device.index, x2.dtype, g.dtype, x2.shape[1], tuple(config), act_bits, hb, has_norm, fp8_codes)
    ok = _SHFL_CHECKED.get(key)
    if ok is False:
        raise RuntimeError(f"bitnet_dist.kernels: the warp-shuffle Hadamard kernel disagrees with the tensor-core "
                           f"kernel for {config}; run with BITNET_SHUFFLE_HADAMARD=0 to use the tensor-core kernels")
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
        _SHFL_CHECKED[key] = ok
        if not ok:
            raise RuntimeError(f"bitnet_dist.kernels: the warp-shuffle Hadamard kernel disagrees with the tensor-core "
                               f"kernel for {config} ({mism:.3g} of codes differ; this Triton builds another register "
                               "layout); run with BITNET_SHUFFLE_HADAMARD=0 to use the tensor-core kernels")
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
    if cfg is False and SELF_CHECK and _capturing():
        return None  # the one-time check syncs: not inside CUDA-graph capture (the tensor-core kernel runs)
    if cfg is False:
        cfg = glu_shuffle_config(x2.shape[1]) if glu else shuffle_config(x2.shape[1])
        if shuffle_layout_ok(x2, cfg, hb) is not None:
            cfg = None
        elif SELF_CHECK:
            _shuffle_verified(x2, g, cfg, act_bits=act_bits, hb=hb, has_norm=has_norm, eps=eps, fp8_codes=fp8_codes)
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
    reduce_tp = group_size(tp_group) > 1 and full != D
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
    """The backward's warp-shuffle config where it applies, else None. With BITNET_KERNEL_SELF_CHECK a one-time
    check against the tensor-core kernels (gradients within bf16 rounding; a wrong register layout gives O(1)
    errors) raises RuntimeError on a mismatch.
    ``glu``: the config of the SwiGLU-folded kernel (``glu_shuffle_bwd_config``; None where it has none), its
    plain form checked here (x2: the gate half)."""
    D = x2.shape[1]
    aligned = all(t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0 for t in (grad_u, x2))
    key = (x2.device.index, x2.dtype, None if norm_weight is None else norm_weight.dtype, D, aligned, hb, glu)
    cfg = _SHFL_BWD_DEFAULT.get(key, False)
    if cfg is False and SELF_CHECK and _capturing():
        return None
    if cfg is False:
        cfg = glu_shuffle_bwd_config(D) if glu else shuffle_bwd_config(D)
        if cfg is None or _bwd_layout_why(grad_u, x2, cfg, hb) is not None:
            cfg = None
        elif SELF_CHECK:
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
                raise RuntimeError(f"bitnet_dist.kernels: the warp-shuffle backward disagrees with the tensor-core "
                                   f"kernel for {cfg} (relative error {err:.3g}; this Triton builds another register "
                                   "layout); run with BITNET_SHUFFLE_HADAMARD=0 to use the tensor-core kernels")
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
# The SwiGLU folded into the warp-shuffle kernels; BITNET_GLU_FOLD=0 composes the SwiGLU kernels
# with the plain ones instead (same values; for A/B measurements and as an escape hatch).
GLU_FOLD = flag("BITNET_GLU_FOLD")


def _glu_split(x2: torch.Tensor) -> int:
    if x2.shape[1] % 2:
        raise ValueError(f"glu=True: the input has {x2.shape[1]} features; h = [gate | up] needs an even count")
    assert x2.stride(1) == 1, "last dim must be contiguous"
    return x2.shape[1] // 2


_GLU_CHECKED: dict = {}


def _glu_verified(kind: str, x2, g, cfg, run, extra: tuple = ()) -> bool:
    """Once per configuration (``extra``: the kernel's other specializations): the GLU form of a warp-shuffle
    kernel equals, bit for bit, the SwiGLU kernel followed by the plain kernel on random rows (it runs the same
    arithmetic), with BITNET_KERNEL_SELF_CHECK on; a mismatch (a Triton that builds another register layout for
    the two-half loads) raises RuntimeError. Off: True without a check."""
    if not SELF_CHECK:
        return True
    key = (kind, x2.device.index, x2.dtype, None if g is None else g.dtype, x2.shape[1], tuple(cfg), *extra)
    ok = _GLU_CHECKED.get(key)
    if ok is None and _capturing():
        return False  # the check syncs: not inside CUDA-graph capture (the composed path runs)
    if ok is None:
        ok = run()
        _GLU_CHECKED[key] = ok
    if not ok:
        raise RuntimeError(f"bitnet_dist.kernels: the {kind} kernel with the SwiGLU folded in disagrees with the "
                           f"SwiGLU kernel + the plain kernel for {cfg}; run with BITNET_GLU_FOLD=0 to compose the two")
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
    reduce_tp = group_size(tp_group) > 1 and full != D
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
    reduce_tp = group_size(tp_group) > 1 and full != D
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
    lo, hi = QRANGE[act_bits]
    codes = torch.round(u / scale[:, None]).clamp_(lo, hi).to(torch.int8)
    return codes, scale, rstd, u
