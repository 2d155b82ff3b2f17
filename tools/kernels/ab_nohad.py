"""A/B of the session-12 change (warp-shuffle kernels for rows without the Hadamard) on whole layer steps:
QKV / fc1 shapes (hadamard_block=0) replayed from a CUDA graph, the new default against the chunked kernels
(``SHUFFLE_FWD`` off, which for these rows is the old default), alternating A / B over several rounds in one
process. ``python tools/kernels/ab_nohad.py --out FILE.jsonl`` (CUDA)."""
import argparse
import json
import statistics

import torch

import bitnet_dist.kernels.norm_hadamard_quant as nhq
from bitnet_dist import step_cache
from bitnet_dist.bench import layer_variants, timed_gpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    shapes = [("7B", "qkv", 4096, 12288, 8192), ("7B", "fc1", 4096, 32768, 8192), ("1.3B", "qkv", 2048, 6144, 8192),
              ("1.3B", "fc1", 2048, 16384, 16384)]
    names = ["linear_bf16", "hbit_a8_bf16bwd", "hbit_a4_bf16bwd", "hbit_a4_fp8bwd"]
    f = open(a.out, "w")
    for model, kind, K, N, T in shapes:
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        g = torch.ones(K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        variants = layer_variants(x, lin, g, False)
        step_cache.advance()
        res = {}
        for r in range(a.rounds):
            for arm in ("shuffle", "chunked"):
                nhq.SHUFFLE_FWD = arm == "shuffle"
                for name in names:
                    fwd = variants[name]

                    def step(fwd=fwd):
                        y = fwd()
                        x.grad = None
                        y.backward(dy)
                    res.setdefault((arm, name), []).append(timed_gpu(step, 2, 10, inner=5, strict=True))
        nhq.SHUFFLE_FWD = True
        for (arm, name), v in res.items():
            row = {"model": model, "layer": kind, "tokens": T, "arm": arm, "variant": name, "ms": v,
                   "median_ms": statistics.median(v)}
            f.write(json.dumps(row) + "\n")
            print(f"[ab] {model} {kind} {T} {arm:8s} {name:16s} " + " ".join(f"{t:.3f}" for t in v)
                  + f"  median {row['median_ms']:.3f}", flush=True)
        del x, lin, g, dy, variants
        torch.cuda.empty_cache()
    f.close()


if __name__ == "__main__":
    main()
