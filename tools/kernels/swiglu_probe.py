"""SwiGLU + Wdown H-BitLinear, fused (glu=True: the SwiGLU folded into the layer's fused kernels; `fused_nofold`:
the SwiGLU kernels inside the layer, composed with the plain ones) against unfused (megatron's
torch ops, or the SwiGLU kernel, then the layer), and the SwiGLU alone both ways: GPU time of fwd + bwd (CUDA
graphs, shuffled interleaved rounds) and the kernels of one step (torch.profiler). 1.3B Wdown shapes.

    python tools/kernels/swiglu_probe.py --out X.json
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from bitnet_dist.bench import timed_gpu_interleaved
import bitnet_dist.kernels.norm_hadamard_quant as nhq
from bitnet_dist.kernels import hbit_linear
from bitnet_dist.kernels.swiglu import swiglu_op


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    h = torch.randn(a.tokens, 2 * a.ffn, device=dev, dtype=torch.bfloat16).requires_grad_()
    w = (0.02 * torch.randn(a.hidden, a.ffn, device=dev)).bfloat16().requires_grad_()
    g = torch.ones(a.ffn, device=dev, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(a.tokens, a.hidden, device=dev, dtype=torch.bfloat16)

    def unfused():
        gate, up = torch.chunk(h, 2, dim=-1)
        x = torch.nn.functional.silu(gate) * (up + 0.0)  # megatron's glu (glu_linear_offset = 0.0)
        y = hbit_linear(x, w, g, act_bits=a.bits, hadamard_block=256, eps=1e-5)
        h.grad = None
        y.backward(dy)

    def unfused_kernel():
        y = hbit_linear(swiglu_op(h), w, g, act_bits=a.bits, hadamard_block=256, eps=1e-5)
        h.grad = None
        y.backward(dy)

    def swiglu_kernel():
        x = swiglu_op(h)
        h.grad = None
        x.backward(torch.ones_like(x))

    def fused():
        y = hbit_linear(h, w, g, act_bits=a.bits, hadamard_block=256, eps=1e-5, glu=True)
        h.grad = None
        y.backward(dy)

    def fused_nofold():  # glu=True with the SwiGLU kernels composed with the plain kernels (before session 15)
        nhq.GLU_FOLD = False
        try:
            fused()
        finally:
            nhq.GLU_FOLD = True

    def swiglu_only():  # the activation alone, fwd + bwd (megatron's ops)
        gate, up = torch.chunk(h, 2, dim=-1)
        x = torch.nn.functional.silu(gate) * (up + 0.0)
        h.grad = None
        x.backward(torch.ones_like(x))

    fns = {"unfused": unfused, "unfused_kernel": unfused_kernel, "fused": fused, "fused_nofold": fused_nofold,
           "swiglu_only": swiglu_only,
           "swiglu_kernel": swiglu_kernel}
    ms, errors = timed_gpu_interleaved(fns, warmup=3, reps=15, inner=5)
    res = {"device": torch.cuda.get_device_name(0), "shape": vars(a), "ms": ms, "errors": errors, "kernels": {}}
    for name, f in fns.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            f()
            torch.cuda.synchronize()
        rows = [(e.key, e.count, e.device_time_total / 1e3) for e in prof.key_averages()
                if e.device_time_total > 0]
        rows.sort(key=lambda r: -r[2])
        res["kernels"][name] = rows[:25]
        print(f"== {name}: {ms.get(name, float('nan')):.3f} ms (graph, median) {errors.get(name, '')}")
        for k, c, t in rows[:25]:
            print(f"  {t:8.3f} ms  x{c:<3d} {k[:110]}")
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
