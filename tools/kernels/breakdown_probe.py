"""Why did the benchmark's breakdown time the fused forward slower than its fused table (session 12)?
Times ``norm_hadamard_quant`` (INT8, block 256) on Wo-like shapes: alone on a fresh input, then inside a
context like the breakdown's (the layer's other operands allocated), then through bench_breakdown itself,
then alone again. ``python tools/kernels/breakdown_probe.py`` (CUDA)."""
from types import SimpleNamespace

import torch

from bitnet_dist.bench import timed_gpu
from bitnet_dist.bench_breakdown import bench_breakdown
from bitnet_dist.kernels.norm_hadamard_quant import norm_hadamard_quant


def nhq_ms(x, g):
    return timed_gpu(lambda: norm_hadamard_quant(x, g, act_bits=8, hadamard_block=256, eps=1e-5), 5, 30)


def main():
    for T, K in ((8192, 2048), (8192, 4096), (16384, 8192)):
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(K, device="cuda", dtype=torch.bfloat16)
        a = nhq_ms(x, g)
        others = [torch.randn(T, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        b = nhq_ms(x, g)
        c8, s8, rstd = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=256, eps=1e-5)
        c = nhq_ms(x, g)
        rows = bench_breakdown(SimpleNamespace(tokens=[T]), 3.0, [], lambda fn: timed_gpu(fn, 5, 30),
                               shapes=[("p", "wo", K, K, True, T)])
        d = rows[0]["parts_ms"]["nhq_a8"]
        del others, c8, s8, rstd
        e = nhq_ms(x, g)
        x2 = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        f = nhq_ms(x2, g)
        xr = torch.randn(T, K, device="cuda", dtype=torch.bfloat16) * 0.02
        h = nhq_ms(xr, g)
        print(f"[probe] T={T} K={K} alone {a:.4f} | others allocated {b:.4f} | after a call {c:.4f} | "
              f"bench_breakdown {d:.4f} | alone again {e:.4f} | fresh x {f:.4f} | x*0.02 {h:.4f}", flush=True)


if __name__ == "__main__":
    main()
