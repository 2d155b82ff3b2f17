"""Helpers shared by the kernel files: interpreter detection, rounding and Hadamard building blocks.

Rounding is round-half-to-even like ``torch.round``. ``libdevice.rint`` would do it in one instruction on
the GPU, but the Triton interpreter (CPU tests, ``TRITON_INTERPRET=1``) does not implement libdevice, so
``rint`` is built from ``floor``: exact for |x| < 2**23, which every quantizer input here satisfies.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bitnet_dist.switches import flag


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SMS: dict = {}
_CAPS: dict = {}


def device_capability(device: torch.device) -> tuple:
    """CUDA compute capability of ``device`` (cached: checked on every GEMM call)."""
    cap = _CAPS.get(device.index)
    if cap is None:
        cap = _CAPS[device.index] = torch.cuda.get_device_capability(device)
    return cap


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached: this runs on every kernel launch); 4 on CPU."""
    if device.type != "cuda":
        return 4
    n = _SMS.get(device.index)
    if n is None:
        n = _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


# Hadamard products: 0 = fp32 FMA ("ieee"), 1 = TF32x3 on tensor cores, 2 = bf16 split into three bf16
# parts on tensor cores (24 significant bits, the fp32 mantissa). The interpreter only has 0 (its bf16
# dot is not implemented faithfully).
PREC_IEEE, PREC_TF32X3, PREC_BF16X3 = 0, 1, 2


def default_prec() -> int:
    return PREC_IEEE if interpreting() else PREC_BF16X3


if interpreting():
    @triton.jit
    def rint(x):
        """Round half to even (torch.round) for fp32 |x| < 2**23 (the interpreter has no libdevice)."""
        f = tl.floor(x)
        d = x - f
        odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 when f is odd
        up = (d > 0.5) | ((d == 0.5) & (odd == 1.0))
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def round_bf16(x):
        """fp32 -> nearest-even bf16 value, kept in fp32, by bit arithmetic: the interpreter's
        fp32 -> bf16 cast truncates."""
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def quotient(u, scale_r, inv_r):
        """u / scale[row], IEEE-rounded (the interpreter's division is numpy's, already exact)."""
        return tl.math.div_rn(u, scale_r[:, None])
else:
    from triton.language.extra import libdevice

    @triton.jit
    def rint(x):
        """Round half to even (torch.round): one cvt.rni instruction."""
        return libdevice.rint(x)

    @triton.jit
    def round_bf16(x):
        """fp32 -> nearest-even bf16 value, kept in fp32 (cvt.rn.bf16.f32)."""
        return x.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def quotient(u, scale_r, inv_r):
        """u / scale[row] with inv_r = 1 / scale: a multiply and one FMA correction step (Markstein), which
        gives the correctly rounded quotient in all but rare cases next to a rounding boundary, at a
        fraction of the cost of IEEE ``div_rn``."""
        q0 = u * inv_r[:, None]
        rem = tl.fma(-q0, scale_r[:, None], u)
        return tl.fma(rem, inv_r[:, None], q0)


@triton.jit
def round_to(x, xdt: tl.constexpr, X_BF16: tl.constexpr):
    """Round fp32 x to the activation dtype's precision (no-op for fp32)."""
    if X_BF16:
        r = round_bf16(x)
    else:
        r = x.to(xdt).to(tl.float32)
    return r


@triton.jit
def sign_matrix16(N: tl.constexpr):
    """16x16 fp32 kron(I_{16/N}, H_N) with the unnormalized Sylvester H_N (entries -1, 0, 1)."""
    i = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 16)[None, :]
    a = (i % N) & (j % N)
    p = (a & 1) + ((a >> 1) & 1) + ((a >> 2) & 1) + ((a >> 3) & 1)
    s = 1 - 2 * (p & 1)
    s = tl.where((i // N) == (j // N), s, 0)
    return s.to(tl.float32)


@triton.jit
def split_bf16x3(t):
    """fp32 t = hi + mid + lo, three bf16 parts (24 significant bits: exact for |t| in the normal range)."""
    hi = t.to(tl.bfloat16)
    r = t - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def dot16(t, H, PREC: tl.constexpr, EXACT_BF16: tl.constexpr):
    """t [M, 16] fp32 @ H [16, 16] (entries -1/0/1) with fp32 accuracy.

    EXACT_BF16: every entry of ``t`` is a bf16 value, so one bf16 product is already exact.
    """
    if PREC == 0:
        acc = tl.dot(t, H, input_precision="ieee")
    elif PREC == 1:
        acc = tl.dot(t, H, input_precision="tf32x3")
    else:
        Hb = H.to(tl.bfloat16)
        if EXACT_BF16:
            acc = tl.dot(t.to(tl.bfloat16), Hb, out_dtype=tl.float32)
        else:
            hi, mid, lo = split_bf16x3(t)
            # Smallest parts first so their sum is not lost against the large one.
            acc = tl.dot(lo, Hb, out_dtype=tl.float32)
            acc = tl.dot(mid, Hb, acc)
            acc = tl.dot(hi, Hb, acc)
    return acc


@triton.jit
def block_fwht(v, BM: tl.constexpr, C: tl.constexpr, HB: tl.constexpr, PREC: tl.constexpr,
               EXACT_BF16: tl.constexpr):
    """Unnormalized block Walsh-Hadamard of each HB-block of the rows of v [BM, C] (fp32).

    H_HB = H_R (x) H_16 with R = HB / 16: the 16-stage is a [BM*C/16, 16] @ H_16 product; the R-stage
    transposes each block to [16, R] and multiplies groups of 16/R rows by kron(I, H_R). HB <= 16 is one
    product with kron(I_{16/HB}, H_HB). Needs BM * C >= 256 (tensor-core minimum of 16 rows).
    """
    if HB <= 16:
        t = tl.reshape(v, (BM * C // 16, 16))
        t = dot16(t, sign_matrix16(HB), PREC, EXACT_BF16)
        out = tl.reshape(t, (BM, C))
    else:
        R: tl.constexpr = HB // 16
        t = tl.reshape(v, (BM * C // 16, 16))
        t = dot16(t, sign_matrix16(16), PREC, EXACT_BF16)
        t = tl.reshape(t, (BM * C // HB, R, 16))
        t = tl.permute(t, (0, 2, 1))
        t = tl.reshape(t, (BM * C // 16, 16))
        t = dot16(t, sign_matrix16(R), PREC, False)
        t = tl.reshape(t, (BM * C // HB, 16, R))
        t = tl.permute(t, (0, 2, 1))
        out = tl.reshape(t, (BM, C))
    return out


@triton.jit
def dot16_left(Hb, y, PREC: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Hb [G, 16, 16] (entries -1/0/1, any float dtype) @ y [G, 16, 16] fp32, batched, with fp32 accuracy
    (three bf16 parts of ``y`` on tensor cores, or one TF32x3 / IEEE product). EXACT_BF16: every entry of
    ``y`` is a bf16 value, so one bf16 product is already exact."""
    if PREC == 0:
        acc = tl.dot(Hb.to(tl.float32), y, input_precision="ieee")
    elif PREC == 1:
        acc = tl.dot(Hb.to(tl.float32), y, input_precision="tf32x3")
    else:
        H = Hb.to(tl.bfloat16)
        if EXACT_BF16:
            acc = tl.dot(H, y.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            hi, mid, lo = split_bf16x3(y)
            acc = tl.dot(H, lo, out_dtype=tl.float32)
            acc = tl.dot(H, mid, acc)
            acc = tl.dot(H, hi, acc)
    return acc


@triton.jit
def block_fwht_rows(v, R: tl.constexpr, HBD: tl.constexpr, HB: tl.constexpr, PREC: tl.constexpr,
                    EXACT_BF16: tl.constexpr, BLOCK_STAGE_FIRST: tl.constexpr):
    """Unnormalized block Walsh-Hadamard of v [R, HBD] (fp32) where every HB-block lies inside a row.

    H_HB = H_A (x) H_16 (A = HB / 16): the 16-stage multiplies rows of 16 by H_16 from the right; the
    A-stage left-multiplies each group of 16 such rows (16 / A whole blocks) by kron(I_{16/A}, H_A), as a
    batched [16, 16] @ [16, 16] product, so no transpose of the data is needed. Stage order: the 16-stage
    first (HMODE 3), or with BLOCK_STAGE_FIRST the A-stage first (HMODE 4: its right operand is the loaded
    data, one exact product for bf16; the 16-stage's left operand is then the first product's result, whose
    three bf16 parts may stay in registers). Measured on the H100: no faster (docs/kernels.md)."""
    G: tl.constexpr = R * HBD // 256
    if HB <= 16:
        t = tl.reshape(v, (R * HBD // 16, 16))
        t = dot16(t, sign_matrix16(HB), PREC, EXACT_BF16)
        out = tl.reshape(t, (R, HBD))
    else:
        A: tl.constexpr = HB // 16
        Hl = tl.broadcast_to(sign_matrix16(A)[None, :, :], (G, 16, 16))
        if BLOCK_STAGE_FIRST:
            t = dot16_left(Hl, tl.reshape(v, (G, 16, 16)), PREC, EXACT_BF16)
            t = dot16(t, tl.broadcast_to(sign_matrix16(16)[None, :, :], (G, 16, 16)), PREC, False)
        else:
            t = dot16(tl.reshape(v, (R * HBD // 16, 16)), sign_matrix16(16), PREC, EXACT_BF16)
            t = dot16_left(Hl, tl.reshape(t, (G, 16, 16)), PREC, False)
        out = tl.reshape(t, (R, HBD))
    return out


# ------------------------------------------------------------------------- warp-shuffle Walsh-Hadamard
# In the natural [BM, C] layout (C the contiguous axis) Triton gives each thread VEC consecutive features, the
# 16-byte vector of the kernel's narrowest store (16 one-byte codes, 8 bf16 gradients; fewer where the tile
# has fewer elements per thread), and the lanes of a warp consecutive VEC-groups, so feature-index bit
# k < log2(VEC) is a register bit and bit log2(VEC) + j is lane bit j. A butterfly over a register bit is a
# split / join of registers; over a lane bit it is one ``shfl.sync.bfly`` per element. The launchers take this
# path only for 16-byte aligned rows and check it once per configuration against the tensor-core kernels
# (norm_hadamard_quant.py: ``_shuffle_verified``, ``_default_shuffle_bwd``).
if interpreting():
    @triton.jit
    def lane_partner(v, BM: tl.constexpr, C: tl.constexpr, BIT: tl.constexpr, MASK: tl.constexpr):
        """The element whose feature index differs in bit BIT (interpreter: by reshaping)."""
        a, b = tl.split(tl.permute(tl.reshape(v, (BM, C // (2 * BIT), 2, BIT)), (0, 1, 3, 2)))
        return tl.reshape(tl.permute(tl.join(b, a), (0, 1, 3, 2)), (BM, C))
else:
    @triton.jit
    def lane_partner(v, BM: tl.constexpr, C: tl.constexpr, BIT: tl.constexpr, MASK: tl.constexpr):
        """The element whose feature index differs in bit BIT = lane bit MASK: a butterfly lane shuffle."""
        r = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r",
                                      [v.to(tl.int32, bitcast=True), tl.full(v.shape, MASK, tl.int32)],
                                      dtype=tl.int32, is_pure=True, pack=1)
        return r.to(tl.float32, bitcast=True)


@triton.jit
def _wht_stage(v, cols, BM: tl.constexpr, C: tl.constexpr, BIT: tl.constexpr, VEC: tl.constexpr):
    """One butterfly over feature-index bit BIT of v [BM, C] fp32 (pairs BIT apart: sum low, difference high)."""
    if BIT < VEC:
        a, b = tl.split(tl.permute(tl.reshape(v, (BM, C // (2 * BIT), 2, BIT)), (0, 1, 3, 2)))
        out = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BM, C))
    else:
        p = lane_partner(v, BM, C, BIT, BIT // VEC)
        # p + v for the low element, p - v for the high one: one FMA with a per-lane sign (exact: s = +-1).
        sgn = tl.where((cols & BIT) != 0, -1.0, 1.0)
        out = tl.fma(sgn[None, :] + tl.zeros_like(v), v, p)
    return out


@triton.jit
def fwht_shuffle(v, cols, BM: tl.constexpr, C: tl.constexpr, HB: tl.constexpr, VEC: tl.constexpr):
    """Unnormalized Walsh-Hadamard of every HB-block (HB <= 256) of the rows of v [BM, C] (fp32): log2(HB)
    butterflies in fp32 adds, in the order of ``bitnet_dist.hadamard`` (bit 0 first)."""
    if HB >= 2:
        v = _wht_stage(v, cols, BM, C, 1, VEC)
    if HB >= 4:
        v = _wht_stage(v, cols, BM, C, 2, VEC)
    if HB >= 8:
        v = _wht_stage(v, cols, BM, C, 4, VEC)
    if HB >= 16:
        v = _wht_stage(v, cols, BM, C, 8, VEC)
    if HB >= 32:
        v = _wht_stage(v, cols, BM, C, 16, VEC)
    if HB >= 64:
        v = _wht_stage(v, cols, BM, C, 32, VEC)
    if HB >= 128:
        v = _wht_stage(v, cols, BM, C, 64, VEC)
    if HB >= 256:
        v = _wht_stage(v, cols, BM, C, 128, VEC)
    return v


# ------------------------------------------------------------------ packed bf16 / int8 helpers (sm_90)
# LLVM lowers bf16 <-> fp32 one element at a time (extract, shift: 1.5 instructions per element) and an int8
# store as a 16-bit convert, a mask and two byte permutes per element. The warp-shuffle forward was issue-bound
# (docs/kernels.md), so on sm_90 it works on bf16 pairs in one 32-bit register instead: a shift and a mask
# unpack a pair, one cvt.rn.bf16x2.f32 rounds two values, one mul.rn.bf16x2 multiplies two exact bf16 products
# with one rounding each, and cvt.rni + cvt.pack.sat turn four quotients into four int8 codes in one register
# (ptxas: F2IP, two per instruction). Each gives the same bits as the element-wise form (the interpreter
# versions below, which the CPU tests run): the product of two bf16 values is exact in fp32 and the rounding
# is round-to-nearest-even in both. SASS per element of the INT8 forward at 8192 features: 32.6 -> 26.8.
# Measured slower and dropped: an absmax over packed pairs (max.xorsign.abs.bf16x2 in a tl.reduce), 62-67% of
# copy against 69-80% without (H100).
if interpreting():
    @triton.jit
    def bf16_to_f32(x):
        return x.to(tl.float32)

    @triton.jit
    def bf16_norm_mul(a, g):
        """round_bf16(round_bf16(a) * g) for fp32 a and bf16 g."""
        return round_bf16(round_bf16(a) * g.to(tl.float32))

    @triton.jit
    def round_bf16_pair(a, b):
        return round_bf16(a), round_bf16(b)

    @triton.jit
    def int8_rn(q):
        """Round half to even and convert to int8 (|q| <= 127 here)."""
        return rint(q).to(tl.int8)
else:
    @triton.jit
    def bf16_to_f32(x):
        """bf16 -> fp32, a pair per register: shift the low half up, mask the high half."""
        return tl.inline_asm_elementwise("shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xffff0000;", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)

    @triton.jit
    def bf16_norm_mul(a, g):
        """round_bf16(round_bf16(a) * g) for fp32 a and bf16 g: cvt.rn.bf16x2.f32 then mul.rn.bf16x2, a pair at a
        time, unpacked to fp32."""
        return tl.inline_asm_elementwise(
            "{\n\t.reg .b32 t;\n\tcvt.rn.bf16x2.f32 t, $3, $2;\n\tmul.rn.bf16x2 t, t, $4;\n\t"
            "shl.b32 $0, t, 16;\n\tand.b32 $1, t, 0xffff0000;\n\t}", "=r,=r,r,r,r", [a, g],
            dtype=tl.float32, is_pure=True, pack=2)

    @triton.jit
    def round_bf16_pair(a, b):
        """(round_bf16(a), round_bf16(b)) with one cvt.rn.bf16x2.f32 (a over the pair split of the feature axis:
        the two values share a thread)."""
        return tl.inline_asm_elementwise(
            "{\n\t.reg .b32 t;\n\tcvt.rn.bf16x2.f32 t, $3, $2;\n\tshl.b32 $0, t, 16;\n\t"
            "and.b32 $1, t, 0xffff0000;\n\t}", "=r,=r,r,r", [a, b], dtype=(tl.float32, tl.float32),
            is_pure=True, pack=1)

    @triton.jit
    def int8_rn(q):
        """Round half to even and convert to int8 with saturation, four per register (cvt.rni.s32.f32,
        cvt.pack.sat.s8.s32.b32: byte i holds element i)."""
        return tl.inline_asm_elementwise(
            "{\n\t.reg .s32 a, b, c, d, h;\n\tcvt.rni.s32.f32 a, $1;\n\tcvt.rni.s32.f32 b, $2;\n\t"
            "cvt.rni.s32.f32 c, $3;\n\tcvt.rni.s32.f32 d, $4;\n\tcvt.pack.sat.s8.s32.b32 h, d, c, 0;\n\t"
            "cvt.pack.sat.s8.s32.b32 $0, b, a, h;\n\t}", "=r,r,r,r,r", [q], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def pair_split(v, BM: tl.constexpr, C: tl.constexpr):
    """v [BM, C] -> (even, odd) features [BM, C // 2] (a register split where feature bit 0 is a register bit)."""
    return tl.split(tl.reshape(v, (BM, C // 2, 2)))


@triton.jit
def pair_join(a, b, BM: tl.constexpr, C: tl.constexpr):
    return tl.reshape(tl.join(a, b), (BM, C))


# ------------------------------------------------------------------------------------------ launching
# On by default; BITNET_TRITON_FAST_LAUNCH=0 turns it off (every launch then goes through Triton's JIT path).
# The kernel GPU tests and the megatron resume test run with it on.
_FAST_LAUNCH = flag("BITNET_TRITON_FAST_LAUNCH")


def _arg_spec(a):
    """What Triton may specialize a runtime argument on (a superset, so a reused kernel is always valid):
    dtype and 16-byte alignment of tensors; 16-divisibility, == 1 and the 32-bit range of integers."""
    t = type(a)
    if t is torch.Tensor or t is torch.nn.Parameter:  # the common cases first: this runs for every argument
        return (a.dtype, a.data_ptr() % 16 == 0)
    if t is int:
        return ("i",) + int_spec(a)
    if t is float:
        return "f"
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i",) + int_spec(a)
    if isinstance(a, float):
        return "f"
    if type(a).__name__ == "TensorDescriptor":  # TMA descriptor: block shape, dtype, alignment of base/strides
        return ("desc", tuple(a.block_shape), a.base.dtype, a.base.data_ptr() % 16 == 0,
                tuple(int(v) % 16 == 0 for v in a.strides), tuple(int(v) % 16 == 0 for v in a.shape),
                getattr(a, "padding", None))
    return ("o", type(a).__name__, a)


def int_spec(n: int) -> tuple:
    """``_arg_spec`` of an integer argument without the type dispatch (for the callers' own launch keys)."""
    return (n % 16 == 0, n == 1, -(2 ** 31) <= n < 2 ** 31)


# BITNET_CHECK_LAUNCH_KEYS=1: every ``FastLaunch.launch_keyed`` hit also builds the full key and asserts that it
# names the same compiled kernel (the GPU tests run with it; it costs the host time the keyed path saves).
_CHECK_KEYS = flag("BITNET_CHECK_LAUNCH_KEYS")


class FastLaunch:
    """``FastLaunch(kernel)[grid](*args, **constexprs_and_options)`` launches like ``kernel[grid](...)``.

    The first launch of each specialization goes through Triton's JIT (compiles, returns the compiled
    kernel); later ones call the compiled kernel's own launcher directly, skipping the argument binding and
    cache-key hashing that cost tens of microseconds of host time per launch (measured on the H100: the
    training step of small layers was host-bound). The reuse key is a superset of what Triton specializes
    on (see ``_arg_spec``). On unless ``BITNET_TRITON_FAST_LAUNCH=0``; the interpreter never uses it."""

    def __init__(self, fn):
        self.fn = fn
        self.names = [p.name for p in getattr(fn, "params", ())]  # the interpreter's functions have none
        self.cache: dict = {}
        self.keyed: dict = {}  # launch_keyed: the caller's key -> (compiled kernel, constexpr values)
        self.enabled = _FAST_LAUNCH and not interpreting() and bool(self.names)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _key(self, args, kwargs):
        return (torch.cuda.current_device(), tuple(kwargs.items()), tuple(map(_arg_spec, args)))

    def _launch(self, grid, args, kwargs):
        if not self.enabled:
            return self.fn[grid](*args, **kwargs)
        key = self._key(args, kwargs)
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self.fn[grid](*args, **kwargs)
            if compiled is not None and hasattr(compiled, "__getitem__"):
                self.cache[key] = compiled
            return compiled
        full = args + tuple(kwargs[n] for n in self.names[len(args):])
        g = tuple(grid) + (1,) * (3 - len(grid))
        try:
            compiled[g](*full)
        except TypeError:  # a Triton whose launcher differs: back to the JIT path for good
            self.enabled = False
            self.fn[grid](*args, **kwargs)
        return compiled

    def launch_keyed(self, key, grid: tuple, args: tuple, kwargs: dict):
        """``self[grid](*args, **kwargs)`` with the compiled kernel looked up by the caller's ``key`` (hashable)
        instead of one built from every argument (``_arg_spec`` of each: the larger part of a launch's host
        time). The caller guarantees that calls with equal keys have equal constexprs and options, the same
        device, and arguments with equal ``_arg_spec`` (dtypes, pointer alignment, integer classes).
        ``BITNET_CHECK_LAUNCH_KEYS=1`` checks that guarantee on every call. ``grid``: three entries."""
        hit = self.keyed.get(key) if self.enabled else None
        if hit is None:
            compiled = self._launch(grid, args, kwargs)
            if self.enabled and compiled is not None and hasattr(compiled, "__getitem__"):
                self.keyed[key] = (compiled, tuple(kwargs[n] for n in self.names[len(args):]))
            return compiled
        compiled, tail = hit
        if _CHECK_KEYS and self.cache.get(self._key(args, kwargs)) is not compiled:
            raise AssertionError(f"FastLaunch.launch_keyed: key {key} reused for another specialization of "
                                 f"{getattr(self.fn, '__name__', self.fn)}")
        try:
            compiled[grid](*args, *tail)
        except TypeError:  # as in _launch
            self.enabled = False
            self.fn[grid](*args, **kwargs)
        return compiled
