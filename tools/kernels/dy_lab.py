"""FP8 backward operand prep on the GPU: ``rowwise_fp8`` + ``colwise_fp8_t`` (four reads of dy) against the fused
``dy_fp8_both`` (two reads) over tile shapes; GPU time from CUDA-graph replays, % of a device copy's bandwidth
for the minimum traffic (2 reads of dy, both e4m3 copies written).
Usage: python tools/kernels/dy_lab.py --out FILE.jsonl"""
from __future__ import annotations

import argparse
import json

import torch

from bitnet_dist.bench import bench_copy, timed_gpu
from bitnet_dist.kernels.gemm import colwise_fp8_t, dy_fp8_both, rowwise_fp8


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="*", default=["8192x12288", "16384x12288", "8192x32768", "16384x4096",
                                                   "8192x6144", "8192x2048"])
    p.add_argument("--tiles", nargs="*", default=["64,128,4,1", "64,128,4,4", "64,128,4,8", "64,128,4,16", "32,128,4,16",
                                                  "64,64,4,8", "32,256,4,8"])
    a = p.parse_args()
    copy = bench_copy(argparse.Namespace(warmup=5, reps=20))
    f = open(a.out, "a")
    f.write(json.dumps({"kind": "copy", "device": torch.cuda.get_device_name(), **copy}) + "\n")
    for shape in a.shapes:
        T, N = (int(v) for v in shape.split("x"))
        dy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        alpha = torch.rand(N, device="cuda") + 0.5
        s_a = torch.rand(T, device="cuda") + 0.5
        nbytes = 2 * (2 * T * N) + 2 * T * N  # two reads of bf16 dy, two e4m3 writes
        q0, s0 = rowwise_fp8(dy, alpha)
        qt0, st0 = colwise_fp8_t(dy, s_a)
        ms = timed_gpu(lambda: (rowwise_fp8(dy, alpha), colwise_fp8_t(dy, s_a)), 3, 20)
        rows = [{"kind": "separate", "T": T, "N": N, "ms": ms}]
        for t in a.tiles:
            tile = tuple(int(v) for v in t.split(","))
            qr, sr, qc, sc = dy_fp8_both(dy, alpha, s_a, tile=tile)
            same = bool(torch.equal(qr.view(torch.int8), q0.view(torch.int8)) and torch.equal(sr, s0)
                        and torch.equal(qc.view(torch.int8), qt0.view(torch.int8)) and torch.equal(sc, st0))
            ms = timed_gpu(lambda tile=tile: dy_fp8_both(dy, alpha, s_a, tile=tile), 3, 20)
            rows.append({"kind": "fused", "T": T, "N": N, "tile": tile, "ms": ms, "same_as_separate": same})
        for r in rows:
            r["pct_copy_min_traffic"] = 100 * nbytes / r["ms"] / 1e9 / copy["tb_s"]
            f.write(json.dumps(r) + "\n")
            print(shape, r["kind"], r.get("tile", ""), f"{r['ms']:.3f} ms", f"{r['pct_copy_min_traffic']:.0f}%",
                  r.get("same_as_separate", ""), flush=True)
        del dy


if __name__ == "__main__":
    main()
