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


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels then run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


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
        hi = t.to(tl.bfloat16)
        if EXACT_BF16:
            acc = tl.dot(hi, Hb, out_dtype=tl.float32)
        else:
            r = t - hi.to(tl.float32)
            mid = r.to(tl.bfloat16)
            lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
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
