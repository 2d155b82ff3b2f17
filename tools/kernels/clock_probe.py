"""Is the fused forward slower right after GEMM load? (session 12: the benchmark's breakdown timed
``norm_hadamard_quant`` 7-24% slower than its own fused table on the same shapes, GEMMs agreeing.)

Times the device copy and the fused forward (INT8, block 256) on a few shapes in three phases: after 3 s idle,
right after ~8 s of bf16 GEMMs, after 5 s idle again; records SM / memory clocks, power and temperature
(nvidia-smi) after each measurement. ``python tools/kernels/clock_probe.py --out FILE.jsonl`` (CUDA).
"""
import argparse
import json
import subprocess
import time

import torch

from bitnet_dist.bench import timed_gpu
from bitnet_dist.kernels.norm_hadamard_quant import norm_hadamard_quant


def smi() -> dict:
    q = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.strip().split(", ")
        return dict(zip(q.split(","), out))
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--load-s", type=float, default=8.0)
    a = p.parse_args()
    shapes = [(8192, 2048), (8192, 4096), (16384, 8192)]
    xs = {s: torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in shapes}
    gs = {s: torch.ones(s[1], device="cuda", dtype=torch.bfloat16) for s in shapes}
    big = torch.randn(16384, 8192, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(big)
    ga = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    f = open(a.out, "w")

    def measure(phase):
        ms = timed_gpu(lambda: dst.copy_(big), 5, 30)
        copy_tbs = 2 * big.numel() * 2 / ms / 1e9
        f.write(json.dumps({"phase": phase, "kind": "copy", "tb_s": copy_tbs, **smi()}) + "\n")
        for (T, D) in shapes:
            x, g = xs[(T, D)], gs[(T, D)]
            ms = timed_gpu(lambda: norm_hadamard_quant(x, g, act_bits=8, hadamard_block=256, eps=1e-5), 5, 30)
            tbs = (3 * T * D + 8 * T + 2 * D) / ms / 1e9
            f.write(json.dumps({"phase": phase, "kind": "nhq", "T": T, "D": D, "ms": ms, "tb_s": tbs,
                                "pct_copy": 100 * tbs / copy_tbs, **smi()}) + "\n")
        f.flush()

    def load(seconds):
        t0 = time.time()
        while time.time() - t0 < seconds:
            for _ in range(20):
                ga @ ga
            torch.cuda.synchronize()

    time.sleep(3)
    measure("idle")
    load(a.load_s)
    measure("after_gemm_load")
    time.sleep(5)
    measure("idle_again")
    load(a.load_s)
    measure("after_gemm_load_2")
    f.close()
    for line in open(a.out):
        r = json.loads(line)
        print(r["phase"], r["kind"], r.get("T", ""), r.get("D", ""), round(r.get("pct_copy", r["tb_s"]), 2),
              r.get("clocks.sm"), r.get("clocks.mem"), r.get("power.draw"), r.get("temperature.gpu"),
              r.get("clocks_throttle_reasons.active"))


if __name__ == "__main__":
    main()
