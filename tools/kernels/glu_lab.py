"""Launch configurations of the warp-shuffle kernels with the SwiGLU folded in (glu=True), against the composed
kernels (SwiGLU kernel + plain kernel), at the Wdown widths: GPU time (CUDA graphs, shuffled interleaved rounds)
and the registers / spills of each compiled variant.

    python tools/kernels/glu_lab.py --out X.json [--tokens 8192 --ffn 8192 16384 --bits 4]
"""
from __future__ import annotations

import argparse
import json

import torch

import bitnet_dist.kernels.norm_hadamard_quant as nhq
from bitnet_dist.bench import timed_gpu_interleaved
from bitnet_dist.kernels.swiglu import swiglu, swiglu_backward

FWD = {8192: [("shfl", 1, 2), ("shfl", 1, 4), ("shfl", 1, 8)],
       16384: [("shfl", 1, 4), ("shfl", 1, 8), ("shfl", 1, 16)]}
BWD = {8192: [("shfl", 1, 8, 2, None, True), ("shfl", 1, 8, 1, None, True), ("shfl", 1, 4, 4, None, True),
              ("shfl", 1, 16, 1, None, True)],
       16384: [("shfl", 1, 32, 1, None, True), ("shfl", 1, 16, 1, None, True), ("shfl", 1, 8, 2, None, True),
               ("shfl", 1, 8, 1, None, True)]}


def compiled_stats():
    out = []
    for name, fl in (("fwd", nhq._FWD_SHFL), ("bwd", nhq._BWD_SHFL)):
        for key, k in fl.cache.items():
            kw = dict(key[1])
            if not kw.get("GLU"):
                continue
            out.append(dict(kernel=name, C=kw.get("C"), warps=kw.get("num_warps"), regs=getattr(k, "n_regs", None),
                            spills=getattr(k, "n_spills", None)))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ffn", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0), "args": vars(a), "ms": {}}
    for K in a.ffn:
        torch.manual_seed(0)
        h = torch.randn(a.tokens, 2 * K, device=dev, dtype=torch.bfloat16)
        g = (1 + 0.1 * torch.randn(K, device=dev)).bfloat16()
        gu = torch.randn(a.tokens, K, device=dev, dtype=torch.bfloat16)
        kw = dict(act_bits=a.bits, hadamard_block=256, eps=1e-5, fp8_codes=a.bits == 4)
        _, _, rstd = nhq.norm_hadamard_quant(h, g, glu=True, **kw)
        buf = torch.empty_like(h)
        fns = {"copy_h": lambda: buf.copy_(h),
               "fwd_composed": lambda: nhq.norm_hadamard_quant(swiglu(h), g, **kw),
               "bwd_composed": lambda: swiglu_backward(h, nhq.norm_hadamard_backward(gu, swiglu(h), g, rstd,
                                                                                     hadamard_block=256)[0])}
        for c in FWD[K]:
            fns[f"fwd_fold_w{c[2]}"] = lambda c=c: nhq.norm_hadamard_quant(h, g, glu=True, config=c, **kw)
        for c in BWD[K]:
            fns[f"bwd_fold_w{c[2]}_p{c[3]}"] = lambda c=c: nhq.norm_hadamard_backward(gu, h, g, rstd, hadamard_block=256,
                                                                                   glu=True, config=c)
        ms, errors = timed_gpu_interleaved(fns, warmup=3, reps=15, inner=5)
        res["ms"][K] = ms
        res.setdefault("errors", {})[K] = errors
        print(f"-- K={K} tokens={a.tokens} A{a.bits}")
        for n, v in ms.items():
            print(f"  {n:24s} {v:.4f} ms")
        for n, e in errors.items():
            print(f"  {n:24s} ERROR {e}")
    res["compiled"] = compiled_stats()
    for s in res["compiled"]:
        print("  compiled", s)
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
