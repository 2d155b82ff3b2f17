"""Hadamard-variant lab for the fused kernels (tuning aid): times forward / backward launch configurations of
the flat kernels (HMODE 2 ablation, 3 two-stage products; PREFETCH 0 none, 1 register double buffer) and the warp-shuffle
kernels (``shfl=1``, natural layout) against the
device copy, checks codes / gradients against the chunked kernel, and stops before --budget-s seconds.
Usage: python tools/kernels/hlab.py --out lab.jsonl [--dims 4096 16384] [--only fwd bwd ceiling]"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import triton
import triton.language as tl

from bitnet_dist.bench import bench_copy, timed_gpu as timed
from bitnet_dist.kernels.norm_hadamard_quant import (flat_config, launch_config, norm_hadamard_backward,
                                                     norm_hadamard_quant, shuffle_bwd_config, shuffle_config)

HB = 256


@triton.jit
def _cast_kernel(X, Q, N, BLOCK: tl.constexpr):
    """Ceiling probe: read bf16, write int8 (no reduction)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + o, mask=o < N, other=0.0).to(tl.float32)
    tl.store(Q + o, x.to(tl.int8), mask=o < N)


@triton.jit
def _absmax_kernel(X, Q, S, T, D: tl.constexpr, BM: tl.constexpr):
    """Ceiling probe: per-token absmax INT8 quantization of whole rows (one read, one write, no norm, no
    Hadamard)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, D)
    m = (rows < T)[:, None]
    x = tl.load(X + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-5) / 127.0
    q = tl.extra.cuda.libdevice.rint(x * (1.0 / s)[:, None])
    tl.store(Q + rows[:, None] * D + cols[None, :], q.to(tl.int8), mask=m)
    tl.store(S + rows, s, mask=rows < T)


def ceiling(f, copy, T, D, reps):
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(T, D, device="cuda", dtype=torch.int8)
    s = torch.empty(T, device="cuda", dtype=torch.float32)
    rows = []
    for blk in (2048, 4096, 8192):
        for w in (4, 8):
            ms = timed(lambda: _cast_kernel[(triton.cdiv(T * D, blk),)](x, q, T * D, BLOCK=blk, num_warps=w), 3, reps)
            rows.append({"kind": "ceiling_cast", "T": T, "D": D, "block": blk, "warps": w, "ms": ms,
                         "pct_copy": 100 * 3 * T * D / ms / 1e9 / copy["tb_s"]})
    for el in (2048, 4096, 8192, 16384):
        bm = max(1, el // D)
        if bm * D > 16384:
            continue
        for w in (4, 8, 16):
            ms = timed(lambda: _absmax_kernel[(triton.cdiv(T, bm),)](x, q, s, T, D=D, BM=bm, num_warps=w), 3, reps)
            rows.append({"kind": "ceiling_absmax", "T": T, "D": D, "bm": bm, "warps": w, "ms": ms,
                         "pct_copy": 100 * (3 * T * D + 4 * T) / ms / 1e9 / copy["tb_s"]})
    for r in rows:
        f.write(json.dumps(r) + "\n")
        print(r["kind"], D, {k: r[k] for k in ("block", "bm", "warps") if k in r}, f"{r['pct_copy']:.0f}%", flush=True)
    ms = timed(lambda: x.to(torch.int8), 3, reps)
    r = {"kind": "ceiling_torch_cast", "T": T, "D": D, "ms": ms, "pct_copy": 100 * 3 * T * D / ms / 1e9 / copy["tb_s"]}
    f.write(json.dumps(r) + "\n")
    print("torch x.to(int8)", D, f"{r['pct_copy']:.0f}%", flush=True)


def grid(spec):
    """'hmode=5,7 elems=4096 warps=4,8 pf=1,2 sm=2' -> list of dicts."""
    keys, vals = [], []
    for part in spec.split():
        k, v = part.split("=")
        keys.append(k)
        vals.append([int(t) for t in v.split(",")])
    return [dict(zip(keys, c)) for c in itertools.product(*vals)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*", default=["fwd"])
    p.add_argument("--dims", nargs="*", type=int, default=[4096, 16384])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=500)
    p.add_argument("--fwd", nargs="*", default=["hmode=3 elems=4096 warps=4,8 pf=1 sm=2",
                                                "hmode=2 elems=4096,8192 warps=4,8 pf=0,1 sm=2,4",
                                                "shfl=1 elems=2048,4096,8192,16384 warps=4,8,16"])
    p.add_argument("--bwd", nargs="*", default=["hmode=1 elems=2048 warps=8 pf=0 sm=2",
                                                "shfl=1 elems=2048,4096,8192 warps=4,8 sm=2,4"])
    p.add_argument("--bits", nargs="*", type=int, default=[8])
    a = p.parse_args()
    t_start = time.time()
    f = open(a.out, "a")
    copy = bench_copy(argparse.Namespace(warmup=5, reps=20))
    f.write(json.dumps({"kind": "copy", "device": torch.cuda.get_device_name(), **copy}) + "\n")
    print("copy TB/s", round(copy["tb_s"], 3), flush=True)
    T = a.tokens
    for D in a.dims:
        if "ceiling" in a.only:
            ceiling(f, copy, T, D, a.reps)
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        g = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
        gu = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        ref = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=HB, eps=1e-5, config=launch_config(D, HB))
        ref4 = norm_hadamard_quant(x, g, act_bits=4, hadamard_block=HB, eps=1e-5, fp8_codes=True,
                                   config=launch_config(D, HB))
        gref = norm_hadamard_backward(gu, x, g, ref[2], hadamard_block=HB,
                                      config=launch_config(D, HB, max_chunk=4096, elems=2048))
        jobs = [("fwd", v, bits) for s in a.fwd for v in grid(s) for bits in a.bits] if "fwd" in a.only else []
        jobs += [("bwd", v, 0) for s in a.bwd for v in grid(s)] if "bwd" in a.only else []
        for kind, v, bits in jobs:
            if time.time() - t_start > a.budget_s:
                print("budget reached", flush=True)
                return
            if "shfl" in v and kind == "bwd":
                cfg = shuffle_bwd_config(D, elems=v["elems"], warps=v["warps"], programs_per_sm=v["sm"],
                                         g_tile=bool(v["gt"]) if "gt" in v else None)  # gt: G_TILE
            elif "shfl" in v:
                cfg = shuffle_config(D, elems=v["elems"], warps=v["warps"])
                if "pk" in v:  # pk: the packed forward's parts (bit mask 1 | 4; vec=0: Triton's)
                    cfg = cfg + (v.get("vec") or None, v["pk"])
                else:
                    cfg = cfg + ((v["vec"],) if "vec" in v else ())
            else:
                cfg = (*flat_config(D, HB, elems=v["elems"], hmode=v["hmode"], warps=v["warps"],
                                    programs_per_sm=v["sm"])[:5], v["pf"])
            row = {"kind": kind, "T": T, "D": D, "bits": bits, "cfg": cfg}
            try:
                t0 = time.time()
                if kind == "fwd":
                    fn = lambda: norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=HB, eps=1e-5,  # noqa: E731
                                                     fp8_codes=bits == 4, config=cfg)
                    out = fn()
                    r0 = ref[0] if bits == 8 else ref4[0]
                    row["mismatch"] = float((out[0].view(torch.int8) != r0.view(torch.int8)).float().mean())
                    nbytes = T * D * 3 + 8 * T + 2 * D
                else:
                    fn = lambda: norm_hadamard_backward(gu, x, g, ref[2], hadamard_block=HB, config=cfg)  # noqa: E731
                    out = fn()
                    row["max_err"] = float((out[0].float() - gref[0].float()).abs().max())
                    nbytes = T * D * 6 + 4 * T
                row["compile_s"] = round(time.time() - t0, 2)
                ms = timed(fn, 3, a.reps)
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:400]
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(kind, D, cfg, "ERROR", row["error"][:200], flush=True)
                continue
            row.update(ms=ms, pct_copy=100 * nbytes / ms / 1e9 / copy["tb_s"])
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"{kind} D={D} bits={bits} {cfg}: {row['pct_copy']:.0f}% "
                  f"{'mism %.2g' % row['mismatch'] if kind == 'fwd' else ''}"
                  f"{'err %.2g' % row['max_err'] if kind == 'bwd' else ''} (first call {row['compile_s']} s)",
                  flush=True)
        del x, gu


if __name__ == "__main__":
    main()
