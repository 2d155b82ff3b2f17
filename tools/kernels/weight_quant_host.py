"""Host and GPU time of one step's weight quantization (GPU): every H-BitLinear weight of a model preset
(QKV with its [q, k, v] segments per query group, Wo, fc1 with its [gate; up] segments, Wdown), quantized the
way the first micro-batch of every training step does it (``quantize_weight``, int8 codes and, for A4, FP8
codes), with the three-kernel path, with the composed one (``BITNET_FUSED_WEIGHT_QUANT=0``: the statistic
in torch ops), and all weights at once (``WeightBatch``, what the engines attach since session 18), alternating
over rounds in one process.

* host ms: the loop over all weights queued behind a long GPU sleep, so the host never waits for the GPU;
* GPU ms: CUDA events around the same queued work (after the sleep): the kernels' own time.

Usage: python tools/kernels/weight_quant_host.py [--model 1.3B] [--rounds 7] [--out FILE.json]"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bitnet_dist import step_cache
from bitnet_dist.kernels import ternary
from bitnet_dist.presets import MODEL_PRESETS


def weights(model: str, dev) -> list:
    m = MODEL_PRESETS[model]
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    heads = m.num_attention_heads
    d = h // heads
    per_group = 3 * d  # no GQA in the presets: one query head per group
    qkv_seg = torch.tensor([0] * (per_group - 2 * d) + [1] * d + [2] * d, device=dev).repeat(heads)
    fc1_seg = torch.cat([torch.zeros(f, dtype=torch.long), torch.ones(f, dtype=torch.long)]).to(dev)
    out = []
    for _ in range(L):
        for shape, seg in (((3 * h, h), qkv_seg), ((h, h), None), ((2 * f, h), fc1_seg), ((h, f), None)):
            out.append((torch.randn(shape, device=dev, dtype=torch.bfloat16) * 0.02, seg))
    return out


def one_round(ws, fp8: bool, batch=None) -> tuple:
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU time: the host queues everything before the GPU gets to it
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    t = time.perf_counter()
    if batch is not None:  # what the first layer's cached_ternary call runs in a new step generation
        batch.run(step_cache.advance())
    else:
        for w, seg in ws:
            ternary.quantize_weight(w, seg, fp8=fp8)
    host = time.perf_counter() - t
    e1.record()
    torch.cuda.synchronize()
    return host * 1e3, e0.elapsed_time(e1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="1.3B")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    ws = weights(a.model, dev)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": a.model, "weights": len(ws)}
    for fp8 in (False, True):
        arms = {"fused": [], "composed": [], "batched": []}
        batch = ternary.WeightBatch([ternary.WeightMember(torch.nn.Parameter(w), seg, None, (lambda: fp8))
                                     for w, seg in ws])
        for r in range(a.rounds + 1):  # round 0 compiles / warms up (and builds the batch's tables)
            for arm in arms:
                ternary.FUSED_WEIGHT_QUANT = arm != "composed"
                hm, gm = one_round(ws, fp8, batch if arm == "batched" else None)
                if r:
                    arms[arm].append((hm, gm))
        ternary.FUSED_WEIGHT_QUANT = True
        for arm, v in arms.items():
            key = f"{arm}_{'a4_fp8' if fp8 else 'a8'}"
            res[key] = {"host_ms": statistics.median(x[0] for x in v), "gpu_ms": statistics.median(x[1] for x in v),
                        "host_us_per_weight": statistics.median(x[0] for x in v) * 1e3 / len(ws)}
            print(f"{key:20s} host {res[key]['host_ms']:7.2f} ms ({res[key]['host_us_per_weight']:6.1f} us / weight)"
                  f"  GPU {res[key]['gpu_ms']:6.2f} ms", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
