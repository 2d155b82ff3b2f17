"""Launch-configuration sweep of the fused kernels and the int8 GEMM variants on one GPU (tuning aid;
the committed numbers come from ``python -m bitnet_dist.bench``). Writes JSON lines to --out and prints
a summary per shape. Usage: python tools/kernels/sweep.py --out sweep.jsonl [--only fwd bwd gemm prec hmode]"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bitnet_dist.bench import MODELS, bench_copy, gemm_operands, layer_shapes, timed_gpu as timed
from bitnet_dist.kernels.gemm import fp8_gemm, int8_gemm
from bitnet_dist.kernels.norm_hadamard_quant import (flat_config, launch_config, norm_hadamard_backward,
                                                     norm_hadamard_quant)

HB = 256


def emit(f, row):
    f.write(json.dumps(row) + "\n")
    f.flush()


def fwd_variants(D):
    v = [("classic", launch_config(D, HB))]
    for hmode in (1, 3):
        for elems in (2048, 4096):
            for w in (4, 8):
                for pf in ((True, False) if hmode == 1 else (True,)):
                    cfg = flat_config(D, HB, elems=elems, hmode=hmode, warps=w, prefetch=pf)
                    v.append((f"flat_h{hmode}_bm{cfg[1]}_w{w}_pf{int(pf)}", cfg))
    return v


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*", default=["fwd", "bwd", "gemm"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    args = argparse.Namespace(warmup=3, reps=a.reps)
    f = open(a.out, "a")
    copy = bench_copy(argparse.Namespace(warmup=5, reps=20))
    emit(f, {"kind": "copy", "device": torch.cuda.get_device_name(), **copy})
    print("copy TB/s", round(copy["tb_s"], 3), flush=True)
    T = a.tokens
    dims = sorted({d for h, ff in MODELS.values() for d in (h, ff)})
    if "fwd" in a.only:
        for D in dims:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            g = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
            nbytes = T * D * 3 + 8 * T + 2 * D
            ref = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=HB, eps=1e-5, config=launch_config(D, HB))
            res = []
            ms0 = timed(lambda: norm_hadamard_quant(x, g, act_bits=8, hadamard_block=0, eps=1e-5), 3, a.reps)
            r0 = {"kind": "fwd", "T": T, "D": D, "bits": 8, "variant": "classic_no_hadamard", "per_sm": 0, "ms": ms0,
                  "pct_copy": 100 * nbytes / ms0 / 1e9 / copy["tb_s"]}
            emit(f, r0)
            print(f"fwd D={D}: no Hadamard (classic) {r0['pct_copy']:.0f}%", flush=True)
            for bits in (8, 4):
                for name, cfg in fwd_variants(D) if bits == 8 else fwd_variants(D)[:1] + [("default", None)]:
                    for per_sm in ((2, 4) if cfg is not None and cfg[0] == "flat" else (0,)):
                        c = cfg if per_sm == 0 else (*cfg[:4], per_sm, cfg[5])
                        try:
                            t0 = time.time()
                            out = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=HB, eps=1e-5,
                                                      fp8_codes=bits == 4, config=c)
                            if bits == 8:
                                mism = float((out[0] != ref[0]).float().mean())
                            else:
                                mism = None
                            ms = timed(lambda: norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=HB, eps=1e-5,
                                                                   fp8_codes=bits == 4, config=c), 3, a.reps)
                        except Exception as e:  # noqa: BLE001
                            emit(f, {"kind": "fwd", "D": D, "bits": bits, "variant": name, "error": repr(e)[:300]})
                            continue
                        r = {"kind": "fwd", "T": T, "D": D, "bits": bits, "variant": name, "per_sm": per_sm,
                             "ms": ms, "pct_copy": 100 * nbytes / ms / 1e9 / copy["tb_s"], "mismatch_vs_classic": mism,
                             "first_call_s": round(time.time() - t0, 2)}
                        emit(f, r)
                        res.append(r)
            for bits in (8, 4):
                rr = sorted([r for r in res if r["bits"] == bits], key=lambda r: r["ms"])
                print(f"fwd D={D} bits={bits}: " + "; ".join(f"{r['variant']}/{r['per_sm']} {r['pct_copy']:.0f}%"
                                                             for r in rr[:6])
                      + f" | classic {[r['pct_copy'] for r in rr if r['variant'] == 'classic'][0]:.0f}%", flush=True)
            del x
    if "hmode" in a.only:  # the two-stage Hadamard orders (3: 16-stage first, 4: block stage first) and tile sizes
        for D in dims:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            g = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
            gu = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            ref = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=HB, eps=1e-5, config=launch_config(D, HB))
            gref = norm_hadamard_backward(gu, x, g, ref[2], hadamard_block=HB,
                                          config=launch_config(D, HB, max_chunk=4096, elems=2048))
            for hmode in (3, 4):
                for elems in (4096, 8192):
                    for w in (4, 8):
                        for bits in (8, 4):
                            cfg = flat_config(D, HB, elems=elems, hmode=hmode, warps=w)
                            try:
                                out = norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=HB, eps=1e-5,
                                                          fp8_codes=bits == 4, config=cfg)
                                ms = timed(lambda: norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=HB, eps=1e-5,
                                                                       fp8_codes=bits == 4, config=cfg), 3, a.reps)
                            except Exception as e:  # noqa: BLE001
                                emit(f, {"kind": "hmode_fwd", "D": D, "cfg": cfg, "bits": bits, "error": repr(e)[:300]})
                                continue
                            r = {"kind": "hmode_fwd", "T": T, "D": D, "cfg": cfg, "bits": bits, "ms": ms,
                                 "pct_copy": 100 * (T * D * 3 + 8 * T + 2 * D) / ms / 1e9 / copy["tb_s"],
                                 "mismatch": float((out[0] != ref[0]).float().mean()) if bits == 8 else None}
                            emit(f, r)
                            print(f"hmode fwd D={D} {cfg} bits={bits}: {r['pct_copy']:.0f}% mismatch {r['mismatch']}",
                                  flush=True)
            for hmode in (1, 3, 4):
                for elems in (2048, 4096):
                    cfg = flat_config(D, HB, elems=elems, hmode=hmode, warps=8, prefetch=False)
                    try:
                        gout = norm_hadamard_backward(gu, x, g, ref[2], hadamard_block=HB, config=cfg)
                        ms = timed(lambda: norm_hadamard_backward(gu, x, g, ref[2], hadamard_block=HB, config=cfg),
                                   3, a.reps)
                    except Exception as e:  # noqa: BLE001
                        emit(f, {"kind": "hmode_bwd", "D": D, "cfg": cfg, "error": repr(e)[:300]})
                        continue
                    r = {"kind": "hmode_bwd", "T": T, "D": D, "cfg": cfg, "ms": ms,
                         "pct_copy": 100 * (T * D * 6 + 4 * T) / ms / 1e9 / copy["tb_s"],
                         "max_err": float((gout[0].float() - gref[0].float()).abs().max())}
                    emit(f, r)
                    print(f"hmode bwd D={D} {cfg}: {r['pct_copy']:.0f}% err {r['max_err']:.2g}", flush=True)
            del x, gu
    if "prec" in a.only:  # the Hadamard products' precision mode: bf16x3 (default) against TF32x3
        for D in dims:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            g = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
            gu = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            ref = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=HB, eps=1e-5)
            gref = norm_hadamard_backward(gu, x, g, ref[2], hadamard_block=HB)
            for hmode in (1, 3):
                for prec in (2, 1):
                    cfg = flat_config(D, HB, hmode=hmode)
                    bcfg = flat_config(D, HB, elems=2048, hmode=hmode, warps=8, prefetch=False)
                    try:
                        out = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=HB, eps=1e-5, config=cfg, prec=prec)
                        ms = timed(lambda: norm_hadamard_quant(x, g, act_bits=8, hadamard_block=HB, eps=1e-5,
                                                               config=cfg, prec=prec), 3, a.reps)
                        gout = norm_hadamard_backward(gu, x, g, ref[2], hadamard_block=HB, config=bcfg, prec=prec)
                        bms = timed(lambda: norm_hadamard_backward(gu, x, g, ref[2], hadamard_block=HB, config=bcfg,
                                                                   prec=prec), 3, a.reps)
                    except Exception as e:  # noqa: BLE001
                        emit(f, {"kind": "prec", "D": D, "hmode": hmode, "prec": prec, "error": repr(e)[:300]})
                        continue
                    r = {"kind": "prec", "T": T, "D": D, "hmode": hmode, "prec": prec, "fwd_ms": ms,
                         "fwd_pct_copy": 100 * (T * D * 3 + 8 * T + 2 * D) / ms / 1e9 / copy["tb_s"],
                         "fwd_mismatch": float((out[0] != ref[0]).float().mean()), "bwd_ms": bms,
                         "bwd_pct_copy": 100 * (T * D * 6 + 4 * T) / bms / 1e9 / copy["tb_s"],
                         "bwd_max_err": float((gout[0].float() - gref[0].float()).abs().max())}
                    emit(f, r)
                    print(f"prec D={D} hmode={hmode} prec={prec}: fwd {r['fwd_pct_copy']:.0f}% "
                          f"(mismatch {r['fwd_mismatch']:.2g}) bwd {r['bwd_pct_copy']:.0f}%", flush=True)
            del x, gu
    if "bwd" in a.only:
        for D in dims:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            g = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
            gu = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            _, _, rstd = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=HB, eps=1e-5)
            nbytes = T * D * 6 + 4 * T
            variants = [("classic", launch_config(D, HB, max_chunk=4096, elems=2048))]
            for hmode in (1, 3):
                for elems in (1024, 2048):
                    for w in (4, 8):
                        for pf in ((True, False) if hmode == 1 else (True,)):
                            cfg = flat_config(D, HB, elems=elems, hmode=hmode, warps=w, prefetch=pf)
                            variants.append((f"flat_h{hmode}_bm{cfg[1]}_w{w}_pf{int(pf)}", cfg))
            ref = norm_hadamard_backward(gu, x, g, rstd, hadamard_block=HB, config=variants[0][1])
            res = []
            for name, cfg in variants:
                try:
                    out = norm_hadamard_backward(gu, x, g, rstd, hadamard_block=HB, config=cfg)
                    err = float((out[0].float() - ref[0].float()).abs().max())
                    ms = timed(lambda: norm_hadamard_backward(gu, x, g, rstd, hadamard_block=HB, config=cfg), 3, a.reps)
                except Exception as e:  # noqa: BLE001
                    emit(f, {"kind": "bwd", "D": D, "variant": name, "error": repr(e)[:300]})
                    continue
                r = {"kind": "bwd", "T": T, "D": D, "variant": name, "ms": ms,
                     "pct_copy": 100 * nbytes / ms / 1e9 / copy["tb_s"], "max_err_vs_classic": err}
                emit(f, r)
                res.append(r)
            rr = sorted(res, key=lambda r: r["ms"])
            print(f"bwd D={D}: " + "; ".join(f"{r['variant']} {r['pct_copy']:.0f}%" for r in rr[:4])
                  + f" | classic {[r['pct_copy'] for r in rr if r['variant'] == 'classic'][0]:.0f}%", flush=True)
            del x, gu
    if "gemm" in a.only:
        from bitnet_dist.kernels import gemm as G
        for model, (h, ff) in MODELS.items():
            for kind, K, N, _ in layer_shapes(h, ff):
                flop = 2 * T * K * N
                xa, w, ai, wi, sa, sw = gemm_operands(T, K, N)
                r = {"kind": "gemm", "model": model, "layer": kind, "T": T, "K": K, "N": N}
                r["bf16"] = timed(lambda: torch.mm(xa, w.t()), 5, 20)
                want = G.scaled_gemm_reference(ai, wi, sa, sw)
                for impl in ("ptr", "tma", "tma_persistent"):
                    try:
                        ok = torch.equal(int8_gemm(ai, wi, sa, sw, impl=impl), want)
                        r[impl] = timed(lambda: int8_gemm(ai, wi, sa, sw, impl=impl), 5, 20)
                        r[impl + "_exact"] = ok
                    except Exception as e:  # noqa: BLE001
                        r[impl + "_error"] = repr(e)[:300]
                a8 = (ai.float() / 16).clamp(-8, 7).round().to(torch.float8_e4m3fn)
                w8 = wi.float().to(torch.float8_e4m3fn)
                r["fp8"] = timed(lambda: fp8_gemm(a8, w8, sa, sw), 5, 20)
                for k in ("ptr", "tma", "tma_persistent", "fp8"):
                    if k in r:
                        r[k + "_x"] = r["bf16"] / r[k]
                r["best_tma_config"] = str(getattr(G._int8_gemm_tma_kernel, "best_config", ""))
                emit(f, r)
                print(f"gemm {model} {kind}: bf16 {flop / r['bf16'] / 1e9:.0f} TF; " + ", ".join(
                    f"{k} {r[k + '_x']:.2f}x" for k in ("ptr", "tma", "tma_persistent", "fp8") if k + "_x" in r)
                      + f" exact={[r.get(k + '_exact') for k in ('ptr', 'tma', 'tma_persistent')]}"
                      + ("; errors " + str({k: r[k] for k in r if k.endswith('_error')}) if any(k.endswith('_error') for k in r) else ""),
                      flush=True)
                del xa, w, ai, wi


if __name__ == "__main__":
    main()
