"""GPU time by kernel of one layer forward + backward (the benchmark's layer step), from torch.profiler's CUDA
activity: where the H-BitLinear step spends device time next to nn.Linear bf16, per variant.

Usage: python tools/kernels/layer_profile.py --out DIR [--shapes 7B:wdown:8192 1.3B:qkv:8192 ...] [--iters 10]
Writes DIR/layer_profile.json and DIR/layer_profile.md (per variant: wall ms per step with the steps queued
back to back, summed kernel ms per step, and the kernels above 1% of it)."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bitnet_dist import step_cache
from bitnet_dist.bench import MODELS, layer_shapes, layer_variants


def profile_step(step, iters: int):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / iters * 1e3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels, host = {}, []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = e.self_cuda_time_total
        if us and e.key and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key[:90]] = kernels.get(e.key[:90], 0.0) + us / iters / 1e3
        elif e.self_cpu_time_total:
            host.append((e.key[:70], e.self_cpu_time_total / iters / 1e3, e.count / iters))
    host.sort(key=lambda h: -h[1])
    return wall, kernels, host[:10]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="*", default=["7B:wdown:8192", "7B:qkv:16384", "7B:wo:8192", "1.3B:qkv:8192"])
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "rows": []}
    md = [f"# Layer step GPU time by kernel\n\nDevice: {res['device']}; {res['date']}; torch {res['torch']}. "
          f"`wall`: ms per forward + backward step, {a.iters} steps queued back to back; `kernels`: summed kernel "
          "time per step (torch.profiler CUDA activity); host: the largest self-CPU items with the profiler on.\n"]
    for spec in a.shapes:
        model, kind, T = spec.split(":")
        T = int(T)
        h, f = MODELS[model]
        K, N, had = next((k, n, hd) for nm, k, n, hd in layer_shapes(h, f) if nm == kind)
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        step_cache.advance()
        md.append(f"\n## {model} {kind} ({T} tokens, K={K}, N={N}, hadamard={had})\n")
        vs = layer_variants(x, lin, g, had)
        vs.pop("rmsnorm_linear_bf16")  # the unfused torch baseline: not profiled here
        for name, fwd in vs.items():
            def step(fwd=fwd, dy=dy, x=x):
                y = fwd()
                x.grad = None  # as in bitnet_dist.bench: an activation's gradient is not accumulated
                y.backward(dy)

            x.grad = g.grad = lin.weight.grad = None
            wall, kernels, host = profile_step(step, a.iters)
            total = sum(kernels.values())
            res["rows"].append({"model": model, "layer": kind, "tokens": T, "variant": name, "wall_ms": wall,
                                "kernel_ms": total, "kernels": kernels, "host_top": host})
            md.append(f"\n**{name}**: wall {wall:.3f} ms, kernels {total:.3f} ms\n\n| kernel | ms | % |\n|---|---|---|")
            for k, ms in sorted(kernels.items(), key=lambda kv: -kv[1]):
                if ms >= 0.01 * total:
                    md.append(f"| `{k}` | {ms:.3f} | {100 * ms / total:.0f}% |")
            md.append("\nHost (self CPU ms per step, calls per step, profiler on): " + "; ".join(
                f"`{k}` {ms:.3f} ({n:g})" for k, ms, n in host[:6]))
            print(model, kind, T, name, f"wall {wall:.3f} kernels {total:.3f}", flush=True)
        del x, lin, g, dy
    with open(os.path.join(a.out, "layer_profile.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.join(a.out, "layer_profile.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
