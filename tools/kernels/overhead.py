"""Host (CPU) cost of one H-BitLinear forward + backward on the GPU, against nn.Linear: tiny shapes so the
GPU work is negligible and the loop measures launch and Python overhead; then a cProfile of the same loop.
Usage: python tools/kernels/overhead.py [--out FILE]"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from bitnet_dist import step_cache
from bitnet_dist.kernels import hbit_linear


def loop(fn, n):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--prof-case", default="hbit_a4_fwd_bwd", help="the case profiled (cProfile, torch.profiler)")
    a = p.parse_args()
    T, K, N = 64, 2048, 2048
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
    g = torch.nn.Parameter(torch.ones(K, device="cuda", dtype=torch.bfloat16))
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    step_cache.advance()
    res = {}

    def hb(bits, fp8b=False, hbk=256, norm=True):
        def f():
            y = hbit_linear(x, w, g if norm else None, act_bits=bits, hadamard_block=hbk, eps=1e-5, fp8_backward=fp8b)
            y.backward(dy)
        return f

    h = torch.randn(T, 2 * K, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def glu4():  # Wdown with precision.fused_swiglu: h = [gate | up] in, the SwiGLU folded into the kernels
        hbit_linear(h, w, g, act_bits=4, hadamard_block=256, eps=1e-5, glu=True).backward(dy)

    def no_grad(fn):  # the weight object itself (a .detach() would be a new tensor: a weight-cache miss)
        def f():
            with torch.no_grad():
                return fn()
        return f

    cases = {"linear_fwd_bwd": lambda: lin(x).backward(dy),
             "hbit_a8_fwd_only": no_grad(lambda: hbit_linear(x, w, g, act_bits=8, hadamard_block=256, eps=1e-5)),
             "hbit_a8_fwd_graph_no_bwd": lambda: hbit_linear(x, w, g, act_bits=8, hadamard_block=256, eps=1e-5),
             "hbit_a8_fwd_bwd": hb(8), "hbit_a4_fwd_bwd": hb(4), "hbit_a8_nohad_fwd_bwd": hb(8, hbk=0, norm=False),
             "hbit_a4_glu_fwd_bwd": glu4}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        res[name + "_host_us"] = 1e6 * loop(fn, a.n)
    # a new generation each iteration: the per-step weight quantization included
    def step_like():
        step_cache.advance()
        hb(8)()
    for _ in range(10):
        step_like()
    res["hbit_a8_fwd_bwd_with_weight_quant_host_us"] = 1e6 * loop(step_like, a.n)
    # the pieces, one at a time (host microseconds per call)
    from bitnet_dist.kernels.gemm import int8_gemm
    from bitnet_dist.kernels.norm_hadamard_quant import norm_hadamard_backward, norm_hadamard_quant
    from bitnet_dist.kernels.ternary import cached_ternary, dequantize_rows
    import triton
    import triton.language as tl

    @triton.jit
    def _nop(X, n, B: tl.constexpr):
        i = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(X + i, tl.load(X + i, mask=i < n), mask=i < n)

    xd, wd, gd = x.detach(), w.detach(), g.detach()
    codes, s_a, rstd = norm_hadamard_quant(xd, gd, act_bits=8, hadamard_block=256, eps=1e-5)
    tw = cached_ternary(w, None, None)
    gu = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    buf = torch.zeros(1024, device="cuda")
    pieces = {
        "triton_nop_launch": lambda: _nop[(1,)](buf, 1024, B=1024),
        "torch_empty": lambda: torch.empty((T, K), device="cuda", dtype=torch.int8),
        "torch_mul_kernel": lambda: buf.mul_(1.0),
        "torch_mm_small": lambda: torch.mm(xd, wd.t()),
        "cached_ternary_hit": lambda: cached_ternary(w, None, None),
        "norm_hadamard_quant": lambda: norm_hadamard_quant(xd, gd, act_bits=8, hadamard_block=256, eps=1e-5),
        "int8_gemm": lambda: int8_gemm(codes, tw.codes, s_a, tw.scale),
        "dequantize_rows_weight": lambda: dequantize_rows(tw.codes, tw.scale, torch.bfloat16),
        "norm_hadamard_backward": lambda: norm_hadamard_backward(gu, xd, gd, rstd, hadamard_block=256),
        "kernels_available": lambda: __import__("bitnet_dist.kernels", fromlist=["available"]).available(),
    }
    for name, fn in pieces.items():
        for _ in range(20):
            fn()
        res["piece_" + name + "_host_us"] = 1e6 * loop(fn, a.n)
    print(json.dumps(res, indent=1))
    pr = cProfile.Profile()
    f = cases[a.prof_case]
    pr.enable()
    for _ in range(a.n):
        f()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])
    # host time by operator (torch.profiler, CPU only): where the step's host time goes, C++ included
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            f()
    torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    print(table)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)
            fh.write("\n" + s.getvalue() + "\n" + table)


if __name__ == "__main__":
    main()
