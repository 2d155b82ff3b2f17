"""Lab (session 13, 2026-11-25): the FP8 backward with 1 x 128 block scales (cuBLAS block scaling, one read of dy) against
the row-wise form (per-token / per-channel scales, two reads of dy), on the benchmark's layer shapes.

Per shape: GPU time (CUDA-graph replay) of the operand prep (``dy_fp8_both`` vs ``dy_fp8_block``) and of the
dgrad / wgrad GEMMs in both forms; at the 8192-token shapes also each form's error against the float64 product
of the unquantized operands (dy scaled as in the layer, the ternary weight / the saved codes).
``python tools/kernels/fp8_block_lab.py --out FILE.jsonl`` (CUDA)."""
import argparse
import json
from typing import Optional

import torch
import triton
import triton.language as tl

from bitnet_dist.bench import timed_gpu
from bitnet_dist.bench_breakdown import bench_shapes
from bitnet_dist.kernels.gemm import dy_fp8_both, fp8_gemm, fp8_transpose
from bitnet_dist.kernels.norm_hadamard_quant import norm_hadamard_quant
from bitnet_dist.kernels.ternary import quantize_weight


# ------------------------------------------------------------ the block-scaled form (not in the package)
@triton.jit
def _dy_fp8_block_kernel(X, COLSCALE, ROWSCALE, QR, SR, QC, SC, T, N, stride_x, B: tl.constexpr):
    """One read of a [B, B] tile of dy for both backward GEMMs' operands, scaled per 1 x B block along each
    GEMM's contraction (cuBLAS's 1x128 block scaling): QR[t, n] = e4m3(X * colscale / SR[t, nb]) with
    SR[t, nb] = max over the tile's row of |X * colscale| / 448, and the transposed QC[n, t] =
    e4m3(X * rowscale / SC[n, tb]) with SC[n, tb] = max over the tile's column of |X * rowscale| / 448.
    SR / SC are stored outer-dimension-major (SR[nb * T + t], SC[tb * N + n]), the layout cuBLAS reads.
    T and N are multiples of B (no masks)."""
    pt = tl.program_id(0)
    pn = tl.program_id(1)
    rows = pt * B + tl.arange(0, B)
    cols = pn * B + tl.arange(0, B)
    v = tl.load(X + rows[:, None] * stride_x + cols[None, :]).to(tl.float32)
    a = v * tl.load(COLSCALE + cols)[None, :]
    sr = tl.math.div_rn(tl.maximum(tl.max(tl.abs(a), axis=1), 1e-30), 448.0)
    tl.store(QR + rows[:, None] * N + cols[None, :], (a / sr[:, None]).to(tl.float8e4nv))
    tl.store(SR + pn * T + rows, sr)
    b = v * tl.load(ROWSCALE + rows)[:, None]
    sc = tl.math.div_rn(tl.maximum(tl.max(tl.abs(b), axis=0), 1e-30), 448.0)
    tl.store(QC + cols[None, :] * T + rows[:, None], (b / sc[None, :]).to(tl.float8e4nv))
    tl.store(SC + pt * N + cols, sc)



FP8_BLOCK = 128  # cuBLAS's block-scaled FP8 GEMMs (CUDA 12.9+, sm_90): one scale per 1 x 128 run along K
DY_BLOCK_WARPS = 8


def fp8_block_ok(T: int, N: int, K: int) -> bool:
    """Shapes the block-scaled FP8 backward takes: tokens and output features (the two GEMMs' contraction
    lengths) multiples of the 128-long scale block, input features a multiple of 16 (FP8 GEMM operands)."""
    return T > 0 and N > 0 and K > 0 and T % FP8_BLOCK == 0 and N % FP8_BLOCK == 0 and K % 16 == 0


def dy_fp8_block(dy: torch.Tensor, col_scale: torch.Tensor, row_scale: torch.Tensor):
    """Both backward GEMMs' FP8 operands from one read of dy [T, N] (T, N multiples of 128), each scaled per
    128-long block of its contraction: -> (e4m3 [T, N], fp32 [T, N / 128] scales (dy * col_scale per token and
    128 features), e4m3 [N, T] (transposed), fp32 [N, T / 128] scales (dy * row_scale per channel and 128
    tokens)). The scale tensors are outer-dimension-major views, as ``fp8_gemm_block`` (cuBLAS) wants them."""
    T, N = dy.shape
    B = FP8_BLOCK
    if T % B or N % B:
        raise ValueError(f"dy_fp8_block: dy is {T} x {N}; both dimensions must be multiples of {B} "
                         "(use dy_fp8_both, the row-wise form, for other shapes)")
    assert dy.stride(1) == 1
    qr = torch.empty((T, N), device=dy.device, dtype=torch.float8_e4m3fn)
    qc = torch.empty((N, T), device=dy.device, dtype=torch.float8_e4m3fn)
    sr = torch.empty((N // B, T), device=dy.device, dtype=torch.float32)
    sc = torch.empty((T // B, N), device=dy.device, dtype=torch.float32)
    if T and N:
        _dy_fp8_block_kernel[(T // B, N // B)](dy, col_scale, row_scale, qr, sr, qc, sc, T, N, dy.stride(0), B=B,
                                    num_warps=DY_BLOCK_WARPS)
    return qr, sr.t(), qc, sc.t()


_BLOCK_ONES: dict = {}
_B_SCALE_KN: Optional[bool] = None  # the form of B's block scales this torch takes (fp8_gemm_block)


def _unit_block_scales(rows: int, k: int, device) -> torch.Tensor:
    """All-ones [rows, k / 128] block scales (outer-dimension-major) for an operand that carries no scale."""
    key = (rows, k // FP8_BLOCK, device)
    s = _BLOCK_ONES.get(key)
    if s is None:
        s = _BLOCK_ONES[key] = torch.ones((k // FP8_BLOCK, rows), device=device, dtype=torch.float32).t()
    return s


def fp8_gemm_block(a8: torch.Tensor, b8: torch.Tensor, sa: torch.Tensor, sb: Optional[torch.Tensor] = None,
                   out_dtype=torch.bfloat16) -> torch.Tensor:
    """a8 e4m3 [M, K], b8 e4m3 [N, K] (row-major; B = b8.T), sa fp32 [M, K / 128] and sb fp32 [N, K / 128]
    (None: ones) block scales, outer-dimension-major -> sum over 128-blocks kb of sa[:, kb] sb[:, kb]
    (a8 @ b8.T over the block), fp32 accumulation (cuBLAS 1x128 x 1x128 block scaling)."""
    global _B_SCALE_KN
    if sb is None:
        sb = _unit_block_scales(b8.shape[0], b8.shape[1], b8.device)
    # torch 2.11 wants B's block scales as [K / 128, N] (its "outer-dim-major" for the column-major B = b8.T),
    # later releases' tests pass them as [N, K / 128] with strides (1, N): the first form that torch accepts is kept.
    forms = (True, False) if _B_SCALE_KN is None else (_B_SCALE_KN,)
    for i, kn in enumerate(forms):
        try:
            y = torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb.t() if kn else sb, out_dtype=out_dtype)
        except RuntimeError as e:
            if i + 1 < len(forms) and "scaling" in str(e):
                continue
            raise
        _B_SCALE_KN = kn
        return y


def fp8_gemm_block_reference(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: Optional[torch.Tensor] = None,
                             out_dtype=torch.bfloat16) -> torch.Tensor:
    """float64 twin of ``fp8_gemm_block``: every 1 x 128 block of both operands scaled, then one product."""
    K = a.shape[1]
    ea = a.double() * sa.double().repeat_interleave(FP8_BLOCK, dim=1)[:, :K]
    eb = b.double()
    if sb is not None:
        eb = eb * sb.double().repeat_interleave(FP8_BLOCK, dim=1)[:, :K]
    return (ea @ eb.t()).to(out_dtype)



def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--prep", action="store_true", help="time the row-wise prep's two passes apart, over tiles")
    a = p.parse_args()
    copy_x = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16)
    copy_y = torch.empty_like(copy_x)
    copy_ms = timed_gpu(lambda: copy_y.copy_(copy_x), 5, a.reps)
    copy_tbs = 4 * copy_x.numel() / (copy_ms * 1e9)
    print(f"[lab] copy {copy_tbs:.2f} TB/s", flush=True)
    del copy_x, copy_y
    f = open(a.out, "w")
    f.write(json.dumps({"device": torch.cuda.get_device_name(), "copy_tb_s": copy_tbs}) + "\n")
    if a.prep:
        prep_passes(a, f, copy_tbs)
        return
    for model, kind, K, N, had, T in bench_shapes(a.tokens):
        torch.manual_seed(0)
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        g = torch.ones(K, device="cuda", dtype=torch.bfloat16)
        # a gradient with per-token and per-channel magnitude spread, as real ones have
        dy = (torch.randn(T, N, device="cuda") * torch.rand(T, 1, device="cuda").pow(3)
              * torch.rand(1, N, device="cuda").pow(3)).bfloat16()
        tw = quantize_weight(w, fp8=True)
        c8, s8, _ = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=256 if had else 0, eps=1e-5)
        ones = torch.ones(K, device="cuda", dtype=torch.float32)
        wt, ct = tw.fp8_t(), fp8_transpose(c8)
        d8, sd, e8, se = dy_fp8_both(dy, tw.scale, s8)
        qr, sr, qc, sc = dy_fp8_block(dy, tw.scale, s8)
        fns = {
            "prep_row": lambda: dy_fp8_both(dy, tw.scale, s8),
            "prep_block": lambda: dy_fp8_block(dy, tw.scale, s8),
            "dgrad_row": lambda: fp8_gemm(d8, wt, sd, ones),
            "dgrad_block": lambda: fp8_gemm_block(qr, wt, sr),
            "wgrad_row": lambda: fp8_gemm(e8, ct, se, ones),
            "wgrad_block": lambda: fp8_gemm_block(qc, ct, sc),
        }
        row = {"model": model, "layer": kind, "tokens": T, "K": K, "N": N}
        for name, fn in fns.items():
            try:
                row[name + "_ms"] = timed_gpu(fn, 5, a.reps, strict=True)
            except Exception as e:  # noqa: BLE001
                row[name + "_error"] = repr(e)[:300]
        for name, nbytes in (("prep_row", 6 * T * N), ("prep_block", 4 * T * N)):
            if name + "_ms" in row:
                row[name + "_pct_copy"] = 100 * nbytes / (row[name + "_ms"] * 1e9) / copy_tbs
        if T == min(a.tokens):
            wd = tw.codes.double() * tw.scale.double()[:, None]            # [N, K] dequantized ternary weight
            xd = c8.double() * s8.double()[:, None]                         # [T, K] dequantized saved activation
            ref_u = dy.double() @ wd
            ref_w = dy.double().t() @ xd
            row["dgrad_row_rel"] = rel(fp8_gemm(d8, wt, sd, ones), ref_u)
            row["dgrad_block_rel"] = rel(fp8_gemm_block(qr, wt, sr), ref_u)
            row["wgrad_row_rel"] = rel(fp8_gemm(e8, ct, se, ones), ref_w)
            row["wgrad_block_rel"] = rel(fp8_gemm_block(qc, ct, sc), ref_w)
            row["dgrad_bf16_rel"] = rel(dy @ wd.to(torch.bfloat16), ref_u)
            row["wgrad_bf16_rel"] = rel(dy.t() @ xd.to(torch.bfloat16), ref_w)
            del wd, xd, ref_u, ref_w
        f.write(json.dumps(row) + "\n")
        f.flush()
        print("[lab]", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        del x, w, g, dy, tw, c8, s8, wt, ct, d8, sd, e8, se, qr, sr, qc, sc, fns
        torch.cuda.empty_cache()
    f.close()


@triton.jit
def _amax_variant(X, COLSCALE, ROWSCALE, RAMAX, CAMAX, T, N, stride_x, BT: tl.constexpr, BN: tl.constexpr,
                  R: tl.constexpr, RELAXED: tl.constexpr, PARTIAL: tl.constexpr):
    """kernels.gemm._dy_amax_kernel with Triton's default (acq_rel) or relaxed atomics (the package's kernel has
    used relaxed ones since session 13); PARTIAL: the row maxima stored per column block (RAMAX [N / BN, T], no
    row atomics) for a separate reduction."""
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cm = cols < N
    cs = tl.load(COLSCALE + cols, mask=cm, other=0.0)
    cacc = tl.zeros([BT, BN], tl.float32)
    for r in range(R):
        rows = (tl.program_id(0) * R + r) * BT + tl.arange(0, BT)
        rm = rows < T
        v = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        v = tl.abs(v.to(tl.float32))
        rs = tl.load(ROWSCALE + rows, mask=rm, other=0.0)
        if PARTIAL:
            tl.store(RAMAX + tl.program_id(1) * T + rows, tl.max(v * cs[None, :], axis=1), mask=rm)
        elif RELAXED:
            tl.atomic_max(RAMAX + rows, tl.max(v * cs[None, :], axis=1), mask=rm, sem="relaxed")
        else:
            tl.atomic_max(RAMAX + rows, tl.max(v * cs[None, :], axis=1), mask=rm)
        cacc = tl.maximum(cacc, v * rs[:, None])
    if RELAXED:
        tl.atomic_max(CAMAX + cols, tl.max(cacc, axis=0), mask=cm, sem="relaxed")
    else:
        tl.atomic_max(CAMAX + cols, tl.max(cacc, axis=0), mask=cm)


AMAX_TILES = [(64, 128, 4, 8), (64, 256, 8, 8), (128, 128, 8, 4), (32, 256, 4, 16)]
CAST_TILES = [(64, 128, 4), (128, 128, 8), (128, 64, 4), (128, 128, 4), (32, 128, 4), (64, 256, 8), (128, 256, 8)]


def prep_passes(a, f, copy_tbs):
    """The row-wise prep's amax pass (reads dy) and cast pass (reads dy, writes both e4m3 copies) timed apart
    over tiles, % of copy for their own minimum traffic (2 and 4 bytes per element): the amax pass with acq_rel
    atomics (``amax``), relaxed ones (``amax_relaxed``, the package's since session 13) and without row atomics."""
    from bitnet_dist.kernels import gemm

    for T, N in [(8192, 12288), (16384, 4096), (8192, 32768), (8192, 2048), (16384, 16384)]:
        dy = (torch.randn(T, N, device="cuda") * torch.rand(T, 1, device="cuda")).bfloat16()
        cs, rs = torch.rand(N, device="cuda") + 0.5, torch.rand(T, device="cuda") + 0.5
        amax = torch.zeros(T + N, device="cuda")
        s = torch.empty(T + N, device="cuda")
        qr = torch.empty((T, N), device="cuda", dtype=torch.float8_e4m3fn)
        qc = torch.empty((N, T), device="cuda", dtype=torch.float8_e4m3fn)
        q0 = gemm.dy_fp8_both(dy, cs, rs)
        for bt, bn, w, r in AMAX_TILES:
            def fa(bt=bt, bn=bn, w=w, r=r):
                _amax_variant[(triton.cdiv(T, bt * r), triton.cdiv(N, bn))](
                    dy, cs, rs, amax, amax[T:], T, N, dy.stride(0), BT=bt, BN=bn, R=r, RELAXED=False, PARTIAL=False,
                    num_warps=w)
            ms = timed_gpu(fa, 3, a.reps, strict=True)
            row = {"pass": "amax", "T": T, "N": N, "tile": [bt, bn, w, r], "ms": ms,
                   "pct_copy": 100 * 2 * T * N / (ms * 1e9) / copy_tbs}
            f.write(json.dumps(row) + "\n")
            print("[lab] prep", row, flush=True)
        ref = amax.clone()
        for bt, bn, w, r in [(64, 128, 4, 8), (32, 256, 4, 16), (64, 128, 4, 4), (64, 128, 4, 16)]:
            for partial in (False, True):
                part = torch.zeros((triton.cdiv(N, bn), T), device="cuda")

                def fr(bt=bt, bn=bn, w=w, r=r, partial=partial, part=part):
                    _amax_variant[(triton.cdiv(T, bt * r), triton.cdiv(N, bn))](
                        dy, cs, rs, part if partial else amax, amax[T:], T, N, dy.stride(0), BT=bt, BN=bn, R=r,
                        RELAXED=True, PARTIAL=partial, num_warps=w)
                amax.zero_()
                fr()
                same = bool(torch.equal(amax[T:], ref[T:]) and torch.equal(
                    part.amax(0) if partial else amax[:T], ref[:T]))
                ms = timed_gpu(fr, 3, a.reps, strict=True)
                row = {"pass": "amax_relaxed" + ("_partial" if partial else ""), "T": T, "N": N,
                       "tile": [bt, bn, w, r], "ms": ms, "same": same,
                       "pct_copy": 100 * 2 * T * N / (ms * 1e9) / copy_tbs}
                f.write(json.dumps(row) + "\n")
                print("[lab] prep", row, flush=True)
        amax.zero_()
        fa = None
        gemm._DY_AMAX[(triton.cdiv(T, 64 * 8), triton.cdiv(N, 128))](
            dy, cs, rs, amax, amax[T:], T, N, dy.stride(0), BT=64, BN=128, R=8, num_warps=4)
        for bt, bn, w in CAST_TILES:
            def fc(bt=bt, bn=bn, w=w):
                gemm._DY_FP8[(triton.cdiv(T, bt), triton.cdiv(N, bn))](
                    dy, cs, rs, amax, s, qr, qc, T, N, dy.stride(0), BT=bt, BN=bn, num_warps=w)
            ms = timed_gpu(fc, 3, a.reps, strict=True)
            same = bool(torch.equal(qr.view(torch.int8), q0[0].view(torch.int8))
                        and torch.equal(qc.view(torch.int8), q0[2].view(torch.int8)))
            row = {"pass": "cast", "T": T, "N": N, "tile": [bt, bn, w], "ms": ms, "same": same,
                   "pct_copy": 100 * 4 * T * N / (ms * 1e9) / copy_tbs}
            f.write(json.dumps(row) + "\n")
            print("[lab] prep", row, flush=True)
        del dy, qr, qc, q0
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
