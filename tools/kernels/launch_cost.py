"""Host microseconds of one launch of the fused forward kernel, layer by layer of the launch path (GPU): the
whole ``norm_hadamard_quant`` call, the FastLaunch call, its cache key, Triton's ``compiled[grid](...)`` runner,
the runner with a fixed stream, ``compiled.run`` directly, and torch ops for scale. Tiny shapes: host only.
Usage: python tools/kernels/launch_cost.py [--out FILE.json]"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import triton

from bitnet_dist.kernels import gemm, norm_hadamard_quant as NHQ
from bitnet_dist.kernels._common import _arg_spec


def per_call(fn, n):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):  # median of five loops (the host is shared)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t) / n)
        torch.cuda.synchronize()
    return round(1e6 * sorted(best)[2], 2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--n", type=int, default=500)
    a = p.parse_args()
    T, D = 64, 2048
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(T, D, device="cuda", dtype=torch.int8)
    scale, rstd = torch.empty((2, T), device="cuda")
    kw = dict(act_bits=8, hadamard_block=256, eps=1e-5)
    NHQ.norm_hadamard_quant(x, g, **kw)  # checks, compiles
    cfg = NHQ._default_shuffle(x, g, act_bits=8, hb=256, has_norm=True, eps=1e-5, fp8_codes=False)
    _, bm, warps = cfg[:3]
    C = D
    consts = dict(BITS=8, HB=256, HAS_NORM=True, BM=bm, C=C, ROUND=True, X_BF16=True, Q_FP8=False,
                  VEC=NHQ.shuffle_vec(bm, C, warps), PACKED=NHQ.packed_default(x.device), EVEN=True, GLU=False,
                  num_warps=warps)
    mx = NHQ.shuffle_maxnreg(bm, C, warps, 2, hadamard=True)
    if mx:
        consts["maxnreg"] = mx
    args = (x, g, q, scale, rstd, T, D, x.stride(0), q.stride(0), 1e-5, float(D), 1.0 / math.sqrt(256))
    grid = (triton.cdiv(T, bm),)
    fl = NHQ._FWD_SHFL
    compiled = fl._launch(grid, args, consts)
    key = (torch.cuda.current_device(), tuple(consts.items()), tuple(_arg_spec(v) for v in args))
    full = args + tuple(consts[n] for n in fl.names[len(args):])
    g3 = tuple(grid) + (1, 1)
    s = torch.cuda.current_stream().cuda_stream
    runner = compiled[g3]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__}
    buf = torch.zeros(1024, device="cuda")
    cases = {
        "norm_hadamard_quant": lambda: NHQ.norm_hadamard_quant(x, g, **kw),
        "fastlaunch_call": lambda: fl[grid](*args, **consts),
        "fastlaunch_key": lambda: fl.cache.get((torch.cuda.current_device(), tuple(consts.items()),
                                                tuple(_arg_spec(v) for v in args))),
        "compiled_getitem_call": lambda: compiled[g3](*full),
        "runner_fixed_stream": lambda: runner(*full, stream=s),
        "compiled_run": lambda: compiled.run(g3[0], g3[1], g3[2], s, compiled.function, compiled.packed_metadata,
                                             None, None, None, *full),
        "torch_mul_": lambda: buf.mul_(1.0),
        "torch_empty": lambda: torch.empty((T, D), device="cuda", dtype=torch.int8),
        "torch_empty_2xT": lambda: torch.empty((2, T), device="cuda"),
        "current_stream": lambda: torch.cuda.current_stream().cuda_stream,
        "reshape": lambda: x.reshape(-1, D),
        "data_ptr": lambda: x.data_ptr(),
        "stride0": lambda: x.stride(0),
        "dict_14": lambda: dict(BITS=8, HB=256, HAS_NORM=True, BM=bm, C=C, ROUND=True, X_BF16=True, Q_FP8=False,
                                VEC=16, PACKED=5, EVEN=True, GLU=False, num_warps=warps),
    }
    assert key in fl.cache
    w8 = torch.randint(-1, 2, (D, D), device="cuda").to(torch.float8_e4m3fn)
    a8 = torch.randint(-8, 8, (T, D), device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.rand(T, device="cuda"), torch.rand(D, device="cuda")
    sa2, sb2, w8t = sa.view(-1, 1), sb.view(1, -1), w8.t()
    cases["fp8_gemm"] = lambda: gemm.fp8_gemm(a8, w8, sa, sb)
    cases["scaled_mm_prepared"] = lambda: torch._scaled_mm(a8, w8t, scale_a=sa2, scale_b=sb2, out_dtype=torch.bfloat16)
    for name, fn in cases.items():
        res[name] = per_call(fn, a.n)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
