"""Where one training step's time goes: ``trainer.profile_step=N`` profiles optimizer step N (1-based) with
torch.profiler and writes ``run_dir/profile_step_N.json``; the end-to-end benchmark's peers do the same
(``bitnet_dist.bench_peers``), so the two are split into the same parts.

The device's kernels (CUDA activity; the CPU's own ops on a machine without one) are summed by category from their
names: GEMMs, attention, this project's Triton kernels, compiled (inductor) kernels, cross-entropy / softmax, norms,
the optimizer's multi-tensor kernels, communication, copies, other elementwise work. ``idle_ms`` is the step's wall
time minus the kernels' summed time (host gaps where kernels do not overlap; kernels on several streams can make
it negative). Names decide the category, first match wins (``CATEGORIES``); the 20 largest kernels are listed as
they are, so a reader can check the split.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Optional

import torch

CATEGORIES = (
    ("communication", ("nccl", "allreduce", "all_reduce", "reduce_scatter", "allgather", "all_gather")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("bitnet kernels", ("norm_hadamard", "_nhq", "_nhb", "swiglu", "ternary", "dequant", "_wq_", "weight_quant",
                        "int8_gemm", "fp8_transpose", "dy_fp8", "rowwise_fp8", "colwise_fp8")),
    ("compiled (inductor)", ("triton_poi", "triton_red", "triton_per", "triton_tem")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "addmm", "::mm", "scaled_mm", "_int_mm",
              "bmm")),
    ("cross-entropy / softmax", ("softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("norm", ("rms_norm", "layer_norm", "rmsnorm", "layernorm")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "fused_sgd", "_amp_")),
    ("copy", ("memcpy", "memset", "copy_", "::cat", "catarraybatched", "::to", "_to_copy")),
    ("elementwise / reduction", ("elementwise", "vectorized", "unrolled", "reduce_kernel", "reduce", "::mul",
                                 "::add", "::sub", "::div", "::neg", "::exp", "::sum", "::max")),
)


def categorize(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def breakdown(kernels: list[tuple[str, float, int]], wall_ms: float) -> dict:
    """kernels: (name, total ms, calls) -> {"wall_ms", "kernel_ms", "idle_ms", "by_category_ms", "top"}."""
    by: dict[str, float] = {}
    for name, ms, _ in kernels:
        by[categorize(name)] = by.get(categorize(name), 0.0) + ms
    total = sum(by.values())
    top = sorted(kernels, key=lambda k: -k[1])[:20]
    return {"wall_ms": wall_ms, "kernel_ms": total, "idle_ms": wall_ms - total,
            "by_category_ms": dict(sorted(by.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:160], "ms": ms, "calls": c, "category": categorize(n)} for n, ms, c in top]}


def _kernel_times(prof, cuda: bool) -> list[tuple[str, float, int]]:
    out = []
    for e in prof.key_averages():
        if cuda:
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0.0)
            if not us or getattr(e, "device_type", None) not in (None, torch.autograd.DeviceType.CUDA):
                continue
        else:
            us = e.self_cpu_time_total
            if not us:
                continue
        out.append((e.key, us / 1000.0, int(e.count)))
    return out


@contextlib.contextmanager
def profile_step(path: Path, device, *, meta: Optional[dict] = None):
    """Profile the block (one training step, synchronized at its end) and write its breakdown to ``path``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1000.0
    res = breakdown(_kernel_times(prof, cuda), wall_ms)
    res.update({"device": device.type, **(meta or {})})
    Path(path).write_text(json.dumps(res, indent=1))
