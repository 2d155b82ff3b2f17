"""Where the host time of one H-BitLinear forward + backward goes (GPU, tiny shapes so the GPU never waits for
work and the loop measures the host): every function the autograd Function calls is wrapped with a
perf_counter timer (inclusive microseconds per layer call), and the whole forward (``apply``) and backward
(``y.backward``) are timed around. The layer cases run with the launch plans (docs/kernels.md) on and off,
alternating over rounds (medians per arm). What no wrapper covers is the autograd plumbing and torch ops called
directly (reshape, .to, sum). Baselines in the same run: nn.Linear, and an autograd.Function that launches
nothing (torch.empty outputs / gradients): the floor of any design built on a Python autograd Function.

Usage: python tools/kernels/host_breakdown.py [--out FILE.json] [--n 300]"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from bitnet_dist import step_cache
from bitnet_dist.kernels import hbit_autograd as HA
from bitnet_dist.kernels import norm_hadamard_quant as NHQ

ACC: collections.Counter = collections.Counter()


def timed(name, fn):
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            ACC[name] += time.perf_counter() - t
    return w


class NullFunction(torch.autograd.Function):
    """Launches nothing: the host floor of a Python autograd Function with the H-BitLinear's arguments."""

    @staticmethod
    def forward(ctx, x, weight, norm_weight):
        ctx.save_for_backward(x, norm_weight)
        return torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, g = ctx.saved_tensors
        return torch.empty_like(x), torch.empty((dy.shape[1], x.shape[1]), device=x.device, dtype=x.dtype), \
            torch.empty_like(g)


def loop(fn, n):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    ACC.clear()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return 1e6 * host, {k: round(1e6 * v / n, 1) for k, v in ACC.most_common()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    T, K, N = 64, 2048, 2048
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(T, 2 * K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
    g = torch.nn.Parameter(torch.ones(K, device="cuda", dtype=torch.bfloat16))
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
    step_cache.advance()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [T, K, N]}

    def hb(bits, glu=False, hbk=256, fp8b=False):
        inp = h if glu else x

        def f():
            t = time.perf_counter()
            y = HA.hbit_linear(inp, w, g, act_bits=bits, hadamard_block=hbk, eps=1e-5, glu=glu, fp8_backward=fp8b)
            t1 = time.perf_counter()
            y.backward(dy)
            t2 = time.perf_counter()
            ACC["= hbit_linear (forward, apply)"] += t1 - t
            ACC["= y.backward"] += t2 - t1
        return f

    def lin_f():
        t = time.perf_counter()
        y = lin(x)
        t1 = time.perf_counter()
        y.backward(dy)
        ACC["= forward"] += t1 - t
        ACC["= y.backward"] += time.perf_counter() - t1

    def null_f():
        t = time.perf_counter()
        y = NullFunction.apply(x, w, g)
        t1 = time.perf_counter()
        y.backward(dy)
        ACC["= forward"] += t1 - t
        ACC["= y.backward"] += time.perf_counter() - t1

    res["linear_fwd_bwd"] = loop(lin_f, a.n)
    res["null_function_fwd_bwd"] = loop(null_f, a.n)
    # wrap what the Function calls (module globals looked up at call time) and the Function itself
    for name in ("cached_ternary", "norm_hadamard_quant", "fp8_gemm", "int8_gemm", "dequantize_rows",
                 "norm_hadamard_backward", "dy_fp8_both", "fp8_transpose", "_rows", "fp8_available"):
        setattr(HA, name, timed(name, getattr(HA, name)))
    for name in ("_default_shuffle", "_nhq_shfl", "_default_shuffle_bwd", "_nhb_shfl", "_nhq_glu", "_nhb_glu",
                 "_glu_verified", "_capturing"):
        setattr(NHQ, name, timed("nhq." + name, getattr(NHQ, name)))
    NHQ._FWD_SHFL._launch = timed("launch fwd_shfl", NHQ._FWD_SHFL._launch)
    NHQ._BWD_SHFL._launch = timed("launch bwd_shfl", NHQ._BWD_SHFL._launch)
    fwd, bwd = HA.HBitLinearFunction.forward, HA.HBitLinearFunction.backward
    HA.HBitLinearFunction.forward = staticmethod(timed("Function.forward", fwd))
    HA.HBitLinearFunction.backward = staticmethod(timed("Function.backward", bwd))
    from bitnet_dist.kernels import ternary
    ternary.TernaryWeight.dequantized = timed("TernaryWeight.dequantized", ternary.TernaryWeight.dequantized)
    cases = {"hbit_a8": hb(8), "hbit_a4": hb(4), "hbit_a4_glu": hb(4, glu=True), "hbit_a8_nohad": hb(8, hbk=0),
             "hbit_a4_fp8bwd": hb(4, fp8b=True)}
    # A / B in one process: the launch plans on and off (NHQ.PLANS_ON), alternating over rounds; medians
    totals: dict = collections.defaultdict(list)
    for _ in range(a.rounds):
        for arm in (True, False):
            NHQ.PLANS_ON = arm
            for case, fn in cases.items():
                host, parts = loop(fn, a.n)
                totals[(case, arm)].append(host)
                res[f"{case}_fwd_bwd{'' if arm else '_noplans'}"] = [host, parts]
    NHQ.PLANS_ON = True
    for (case, arm), v in totals.items():
        res[f"median_{case}{'' if arm else '_noplans'}_us"] = round(sorted(v)[len(v) // 2], 1)
    # single pieces (host microseconds per call)
    codes8 = torch.randint(-8, 8, (T, K), device="cuda").to(torch.float8_e4m3fn)
    w8 = torch.randint(-1, 2, (N, K), device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.rand(T, device="cuda"), torch.rand(N, device="cuda")
    xd, wd = x.detach(), w.detach()
    ggp = torch.randn(148, K, device="cuda")
    pieces = {
        "scaled_mm": lambda: torch._scaled_mm(codes8, w8.t(), scale_a=sa.reshape(-1, 1), scale_b=sb.reshape(1, -1),
                                              out_dtype=torch.bfloat16, use_fast_accum=False),
        "mm_bf16": lambda: xd @ wd.t(),
        "ggp_sum0": lambda: ggp.sum(0),
        "to_same_dtype": lambda: xd.to(torch.bfloat16),
        "empty": lambda: torch.empty((T, K), device="cuda", dtype=torch.int8),
        "current_device": lambda: torch.cuda.current_device(),
        "is_capturing": lambda: torch.cuda.is_current_stream_capturing(),
    }
    for name, fn in pieces.items():
        res["piece_" + name] = loop(fn, a.n)[0]
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
