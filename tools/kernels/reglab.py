"""Register / occupancy lab for the warp-shuffle forward (tuning aid, H100): times the forward at the benchmark's
Wo / Wdown shapes under launch variants the earlier sweeps did not cover: a register cap (``maxnreg``, so more
programs fit on an SM), tokens per program and warps. Each variant's codes, scales and rstd are compared with the
default launch's (a variant whose layout pairs the wrong features shows up as a mismatch); registers and spills
come from the compiled kernel. ``maxnreg`` None or 0: no cap; "auto": the launcher's choice (shuffle_maxnreg).
Usage: python tools/kernels/reglab.py --out reglab.jsonl [--set sweep|confirm|above|bwd] [--dims 2048 16384]"""
from __future__ import annotations

import argparse
import json
import math

import torch
import triton

from bitnet_dist.bench import bench_copy, timed_gpu
from bitnet_dist.kernels.norm_hadamard_quant import (_FWD_SHFL, norm_hadamard_quant, packed_default,
                                                     shuffle_config, shuffle_maxnreg, shuffle_vec)

HB = 256
VARIANTS = {  # features -> (tokens per program, warps, maxnreg or None)
    2048: [(1, 2, None), (1, 2, 64), (1, 2, 80), (2, 4, None), (2, 4, 80), (1, 1, None), (4, 8, None)],
    4096: [(1, 2, None), (1, 2, 80), (1, 4, None), (1, 4, 64), (2, 4, None), (2, 4, 80)],
    8192: [(1, 4, None), (1, 4, 80), (1, 4, 72), (1, 8, None), (1, 8, 64)],
    16384: [(1, 8, None), (1, 8, 80), (1, 8, 72), (1, 8, 64), (1, 16, None), (1, 16, 56), (1, 16, 48)],
}
# Second run, after the 16384-feature cap became the default (the launcher's own choice is "auto"): the default
# against no cap (0) and the neighbouring caps; at 2048 features the small gain of a 64-register cap, again.
CONFIRM = {
    2048: [(1, 2, "auto"), (1, 2, 64), (1, 2, 60)],
    16384: [(1, 8, "auto"), (1, 8, 0), (1, 8, 76), (1, 8, 84), (1, 8, 88)],
}
# Third: caps at or above ptxas's own count at 4096 / 8192 features (the 2048-feature gain came from such a cap).
ABOVE = {
    4096: [(1, 2, "auto"), (1, 2, 96), (1, 2, 104), (1, 2, 112), (1, 2, 128)],
    8192: [(1, 4, "auto"), (1, 4, 96), (1, 4, 104), (1, 4, 112), (1, 4, 128)],
}


def launch(x, g, q, s, r, bm, warps, maxnreg, bits):
    T, D = x.shape
    C = max(16, triton.next_power_of_2(D))
    kw = dict(BITS=bits, HB=HB, HAS_NORM=True, BM=bm, C=C, ROUND=True, X_BF16=True, Q_FP8=bits == 4,
              VEC=shuffle_vec(bm, C, warps), PACKED=int(packed_default(x.device)), EVEN=D == C, num_warps=warps)
    if maxnreg == "auto":
        maxnreg = shuffle_maxnreg(bm, C, warps)
    if maxnreg:
        kw["maxnreg"] = maxnreg
    return _FWD_SHFL.fn[(triton.cdiv(T, bm),)](x, g, q, s, r, T, D, x.stride(0), q.stride(0), 1e-6, float(D),
                                               1.0 / math.sqrt(HB), **kw)


# Backward (persistent; the default launches are shuffle_bwd_config's): (tokens per tile, warps, programs per SM,
# G_TILE, maxnreg). 16384 features: 32 warps x 64 registers spill; fewer warps with a cap hold more per thread.
BWD = {
    4096: [(1, 8, 2, False, None), (1, 8, 3, False, 80), (1, 4, 4, False, None), (1, 8, 2, False, 96)],
    8192: [(1, 8, 2, True, None), (1, 8, 3, True, 80), (1, 8, 2, True, 128), (1, 16, 1, True, None),
           (1, 16, 1, True, 128)],
    16384: [(1, 32, 1, True, None), (1, 16, 1, True, 128), (1, 16, 2, True, 64), (1, 8, 2, True, 128),
            (1, 8, 3, True, 80), (1, 16, 1, False, 128)],
}


def bwd_lab(a, f, copy):
    from bitnet_dist.kernels.norm_hadamard_quant import _BWD_SHFL, norm_hadamard_backward, num_sms
    for T in a.tokens:
        for D in a.dims or sorted(BWD):
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            gu = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            g = (1 + 0.1 * torch.randn(D, device="cuda")).to(torch.bfloat16)
            rstd = torch.rand(T, device="cuda") + 0.5
            ref_gx, ref_gg = norm_hadamard_backward(gu, x, g, rstd, hadamard_block=HB)
            C = max(16, triton.next_power_of_2(D))
            for bm, warps, per_sm, g_tile, mr in BWD[D]:
                nprog = max(1, min(triton.cdiv(T, bm), per_sm * num_sms(x.device)))
                ggp = torch.empty((nprog, D), device="cuda", dtype=torch.float32)
                gx = torch.empty_like(x)
                kw = dict(HB=HB, HAS_NORM=True, BM=bm, C=C, VEC=min(8, bm * C // (32 * warps)), G_TILE=g_tile,
                          num_warps=warps)
                if mr:
                    kw["maxnreg"] = mr

                def run():
                    return _BWD_SHFL.fn[(nprog,)](gu, x, g, rstd, gx, ggp, T, D, gu.stride(0), x.stride(0),
                                                  gx.stride(0), 1.0 / D, 1.0 / math.sqrt(HB), **kw)
                row = {"kind": "bwd", "T": T, "D": D, "bm": bm, "warps": warps, "per_sm": per_sm, "g_tile": g_tile,
                       "maxnreg": mr}
                try:
                    k = run()
                    torch.cuda.synchronize()
                    row["regs"], row["spills"] = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
                    row["gx_equal"] = bool(torch.equal(gx, ref_gx))
                    row["gg_maxrel"] = float(((ggp.sum(0) - ref_gg).abs() / ref_gg.abs().clamp_min(1e-3)).max())
                    ms = timed_gpu(run, a.warmup, a.reps)
                    row.update(ms=ms, pct_copy=100 * (6 * T * D) / ms / 1e9 / copy["tb_s"])
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--set", choices=("sweep", "confirm", "above", "bwd"), default="sweep")
    p.add_argument("--dims", type=int, nargs="*")
    p.add_argument("--tokens", type=int, nargs="*", default=[8192, 16384])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    a = p.parse_args()
    variants = {"sweep": VARIANTS, "confirm": CONFIRM, "above": ABOVE, "bwd": {}}[a.set]
    dims = a.dims or sorted(variants)
    copy = bench_copy(a)
    dev = torch.cuda.get_device_name()
    with open(a.out, "a") as f:
        f.write(json.dumps({"kind": "copy", "device": dev, **copy}) + "\n")
        if a.set == "bwd":
            return bwd_lab(a, f, copy)
        for T in a.tokens:
            for D in dims:
                x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
                g = (1 + 0.1 * torch.randn(D, device="cuda")).to(torch.bfloat16)
                for bits in (8, 4):
                    ref = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=HB, eps=1e-6, fp8_codes=bits == 4)
                    qdt = ref[0].dtype
                    for bm, warps, mr in variants[D]:
                        q = torch.empty((T, D), device="cuda", dtype=qdt)
                        s = torch.empty(T, device="cuda")
                        r = torch.empty(T, device="cuda")
                        row = {"kind": "fwd", "T": T, "D": D, "bits": bits, "bm": bm, "warps": warps, "maxnreg": mr,
                               "default": (bm, warps) == tuple(shuffle_config(D)[1:3]) and (
                                   mr == "auto" or (mr or None) == shuffle_maxnreg(bm, max(16, D), warps))}
                        try:
                            k = launch(x, g, q, s, r, bm, warps, mr, bits)
                            torch.cuda.synchronize()
                            row["regs"], row["spills"] = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
                            row["code_mismatch"] = int((q.view(torch.int8) != ref[0].view(torch.int8)).sum())
                            row["scale_equal"] = bool(torch.equal(s, ref[1]) and torch.equal(r, ref[2]))
                            ms = timed_gpu(lambda: launch(x, g, q, s, r, bm, warps, mr, bits), a.warmup, a.reps)
                            row.update(ms=ms, pct_copy=100 * (3 * T * D + 8 * T + 2 * D) / ms / 1e9 / copy["tb_s"])
                        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        print(json.dumps(row), flush=True)
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
