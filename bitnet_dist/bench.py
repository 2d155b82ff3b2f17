"""Kernel benchmark: ``python -m bitnet_dist.bench --out DIR`` (CUDA only).

Measures, in one process on one GPU (every ratio compares numbers from the same run):
* ``copy``: device-to-device copy bandwidth (bytes read + written / time), the memory roofline here.
* ``fused``: RMSNorm -> Hadamard -> quantize kernel at the Wo / Wdown inputs (bytes: x read, codes
  written, scale and rstd written), TB/s and % of the copy bandwidth.
* ``gemm``: forward GEMM TFLOP/s of cuBLAS bf16 (torch.mm), the Triton int8 kernel (A8, dequantization
  in the epilogue), FP8 e4m3 through torch._scaled_mm (A4) and torch._int_mm (cuBLAS int8, no epilogue).
* ``layer``: forward + backward time of one layer: nn.Linear bf16, RMSNorm + nn.Linear bf16, and
  ``hbit_linear`` (A8 / A4, bf16 or FP8 backward); bytes saved for backward (autograd saved-tensor hooks,
  storages counted once) and the step's peak memory above what was allocated before it.
* ``breakdown``: each kernel of one layer step timed alone, and the best speed-up over nn.Linear the design
  allows with the measured GEMMs (``bitnet_dist.bench_breakdown``).
Timing: CUDA events, median of ``--reps`` runs after ``--warmup`` runs. Results: DIR/kernels.json and
DIR/kernels.md (the table in docs/benchmarks/).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

from bitnet_dist import step_cache
from bitnet_dist.bench_breakdown import bench_breakdown
from bitnet_dist.bench_breakdown import to_markdown as breakdown_markdown
from bitnet_dist.bench_shapes import HB, MODELS, layer_shapes
from bitnet_dist.kernels import hbit_linear


def timed(fn, warmup: int, reps: int, inner: int = 1) -> float:
    """Median milliseconds per fn() call over ``reps`` windows of ``inner`` back-to-back calls (CUDA events).
    With inner > 1 the host queues the calls ahead of the GPU as in training, so host overhead counts only
    where it exceeds the GPU time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def _capture(fn, inner: int):
    """fn run once on a side stream (CUDA graph warm-up), then ``inner`` calls captured in one graph, replayed
    once; raises where fn cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def _replay_ms(graph, inner: int) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / inner


def timed_gpu(fn, warmup: int, reps: int, inner: int = 10, strict: bool = False) -> float:
    """Median GPU milliseconds per fn() call: ``inner`` calls captured in one CUDA graph and replayed, so
    no host launch overhead is in the number (kernel time only). Falls back to ``timed`` (inner calls back
    to back) where the capture fails, or raises there with ``strict``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    try:
        graph = _capture(fn, inner)
    except Exception:
        torch.cuda.synchronize()
        if strict:
            raise
        return timed(fn, 1, reps, inner)
    times = [_replay_ms(graph, inner) for _ in range(reps)]
    del graph
    return statistics.median(times)


def interleaved_medians(run_once: Callable[[str], float], names: Sequence[str], reps: int,
                        seed: int = 0) -> Dict[str, float]:
    """Median of ``reps`` timings per name, taken in rounds (one timing of every name per round, the order
    shuffled each round with a fixed seed): a slow drift of the GPU's clock (its power cap, docs/kernels.md)
    then moves every variant alike instead of whichever was timed last, and no variant always runs right after
    the same other one (a GEMM-heavy predecessor leaves the GPU hotter: on the H100 a fixed order moved single
    cells by up to 15%). Ratios taken in one run then compare like with like."""
    rng = random.Random(seed)
    order = list(names)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(reps):
        rng.shuffle(order)
        for n in order:
            times[n].append(run_once(n))
    return {n: statistics.median(t) for n, t in times.items()}


def timed_gpu_interleaved(fns: Dict[str, Callable], warmup: int, reps: int, inner: int = 5):
    """GPU milliseconds per call of each fn: each captured ``inner`` times in its own CUDA graph, then the graphs
    replayed in shuffled rounds (``interleaved_medians``). -> ({name: ms}, {name: error} for those not capturable)."""
    graphs, errors = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            graphs[name] = _capture(fn, inner)
        except Exception as e:
            torch.cuda.synchronize()
            errors[name] = repr(e)[:300]

    def run_once(name):
        return _replay_ms(graphs[name], inner)

    ms = interleaved_medians(run_once, list(graphs), reps)
    del graphs
    return ms, errors


def bench_copy(args, shape=(16384, 8192)):
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = timed_gpu(lambda: y.copy_(x), args.warmup, args.reps)
    return {"bytes": 2 * x.numel() * 2, "ms": ms, "tb_s": 2 * x.numel() * 2 / ms / 1e9}


def bench_fused(args, copy_tbs: float):
    from bitnet_dist.kernels.norm_hadamard_quant import (  # deferred: imports Triton
        flat_config,
        launch_config,
        norm_hadamard_quant,
    )

    rows = []
    dims = sorted({d for h, f in MODELS.values() for d in (h, f)})
    for T in args.tokens:
        for D in dims:
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            g = torch.ones(D, device="cuda", dtype=torch.bfloat16)
            same = bench_copy(args, (T, D))  # same bytes in flight, same L2 effects
            for bits in (8, 4):
                fp8 = bits == 4
                nbytes = T * D * 2 + T * D + 8 * T + 2 * D
                # the default (the warp-shuffle kernel on CUDA) and the tensor-core flat kernel it replaced; the
                # same row without the Hadamard (the QKV / fc1 inputs' kernel), default and the chunked kernel
                variants = [("default", None, None, HB), ("tensor_core_flat", None, flat_config(D, HB), HB),
                            ("no_hadamard", None, None, 0), ("no_hadamard_chunked", None, launch_config(D, 1), 0)]
                if args.sweep and T == max(args.tokens) and bits == 8:
                    for prec in (0, 1, 2):
                        for elems in (2048, 4096, 8192, 16384):
                            cfg = launch_config(D, HB, max_chunk=elems, elems=elems)
                            for w in (4, 8):
                                variants.append((f"prec{prec}_e{elems}_w{w}", prec, (*cfg[:2], w), HB))
                for name, prec, cfg, hb in variants:
                    try:
                        ms = timed_gpu(lambda: norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5,
                                                                   fp8_codes=fp8, prec=prec, config=cfg),
                                       args.warmup, args.reps)
                        host_ms = timed(lambda: norm_hadamard_quant(x, g, act_bits=bits, hadamard_block=hb, eps=1e-5,
                                                                    fp8_codes=fp8, prec=prec, config=cfg),
                                        args.warmup, args.reps)
                    except Exception as e:
                        rows.append({"tokens": T, "dim": D, "act_bits": bits, "variant": name, "error": repr(e)[:200]})
                        continue
                    tbs = nbytes / ms / 1e9
                    rows.append({"tokens": T, "dim": D, "act_bits": bits, "variant": name, "ms": ms, "tb_s": tbs,
                                 "pct_copy": 100 * tbs / copy_tbs, "same_size_copy_tb_s": same["tb_s"],
                                 "pct_same_size_copy": 100 * tbs / same["tb_s"], "single_call_ms": host_ms})
            del x
    return rows


def gemm_operands(T: int, K: int, N: int):
    """bf16 activation / weight, int8 activation codes, ternary weight codes, per-token and per-row scales."""
    a = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    ai = torch.randint(-128, 128, (T, K), device="cuda", dtype=torch.int8)
    wi = torch.randint(-1, 2, (N, K), device="cuda", dtype=torch.int8)
    return a, w, ai, wi, torch.rand(T, device="cuda") + 0.5, torch.rand(N, device="cuda") + 0.5


def bench_gemm(args):
    from bitnet_dist.kernels.gemm import fp8_available, fp8_gemm, int8_gemm  # deferred: imports Triton

    rows = []
    for model, (h, f) in MODELS.items():
        for kind, K, N, _ in layer_shapes(h, f):
            for T in args.tokens:
                flop = 2 * T * K * N
                a, w, ai, wi, sa, sw = gemm_operands(T, K, N)
                r = {"model": model, "layer": kind, "tokens": T, "K": K, "N": N}
                r["bf16_ms"] = timed_gpu(lambda: torch.mm(a, w.t()), args.warmup, args.reps)
                r["int8_ms"] = timed_gpu(lambda: int8_gemm(ai, wi, sa, sw), args.warmup, args.reps)
                try:
                    r["int_mm_ms"] = timed_gpu(lambda: torch._int_mm(ai, wi.t()), args.warmup, args.reps)
                except Exception as e:
                    r["int_mm_error"] = repr(e)[:200]
                if fp8_available(a.device):
                    a8 = (ai.float() / 16).clamp(-8, 7).round().to(torch.float8_e4m3fn)
                    w8 = wi.float().to(torch.float8_e4m3fn)
                    r["fp8_ms"] = timed_gpu(lambda: fp8_gemm(a8, w8, sa, sw), args.warmup, args.reps)
                for k in ("bf16", "int8", "int_mm", "fp8"):
                    if f"{k}_ms" in r:
                        r[f"{k}_tflops"] = flop / r[f"{k}_ms"] / 1e9
                r["int8_vs_bf16"] = r["bf16_ms"] / r["int8_ms"]
                if "fp8_ms" in r:
                    r["fp8_vs_bf16"] = r["bf16_ms"] / r["fp8_ms"]
                rows.append(r)
                del a, w, ai, wi
    return rows


def _saved_bytes(fn, params=()):
    """Bytes of the distinct non-parameter storages autograd saves for backward while running fn()."""
    seen = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def layer_variants(x, lin, g, had: bool) -> dict:
    """The layer benchmark's forward functions over one input x, nn.Linear ``lin`` and norm weight g: bf16
    Linear, bf16 RMSNorm + Linear, and H-BitLinear A8 / A4 with bf16 or FP8 backward GEMMs."""

    def rms_lin():  # torch's fused RMSNorm, as the bf16 model's pre-norms (bitnet_dist.norm.RMSNorm)
        return lin(torch.nn.functional.rms_norm(x, g.shape, g, 1e-5))

    variants = {"linear_bf16": lambda: lin(x), "rmsnorm_linear_bf16": rms_lin}
    for bits in (8, 4):
        for fp8b in (False, True):
            variants[f"hbit_a{bits}_{'fp8' if fp8b else 'bf16'}bwd"] = (
                lambda bits=bits, fp8b=fp8b: hbit_linear(x, lin.weight, g, act_bits=bits,
                                                         hadamard_block=HB if had else 0, eps=1e-5,
                                                         fp8_backward=fp8b))
    return variants


def bench_layer(args):
    from bitnet_dist.kernels.ternary import quantize_weight  # deferred: imports Triton

    rows = []
    for model, (h, f) in MODELS.items():
        for kind, K, N, had in layer_shapes(h, f):
            for T in args.tokens:
                x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
                g = torch.ones(K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                dy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)

                variants = layer_variants(x, lin, g, had)
                r = {"model": model, "layer": kind, "tokens": T, "K": K, "N": N, "hadamard": had}
                # once per optimizer step, amortized over the step's micro-batches (not in the times below)
                r["weight_quant_ms"] = timed(lambda: quantize_weight(lin.weight.detach(), fp8=True), 2, 5)
                step_cache.advance()  # one generation: the timed calls reuse the codes like a step's micro-batches

                def make_step(fwd):
                    def step():
                        y = fwd()
                        x.grad = None  # an activation's gradient is handed on, never accumulated (the weights' are)
                        y.backward(dy)
                    return step

                steps = {name: make_step(fwd) for name, fwd in variants.items()}
                for name, fwd in variants.items():
                    step = steps[name]
                    try:
                        x.grad = g.grad = lin.weight.grad = None
                        # back to back, as in training: host overhead counts where it exceeds GPU time
                        r[f"{name}_ms"] = timed(step, args.warmup, max(3, args.reps // 5), inner=10)
                        x.grad = g.grad = lin.weight.grad = None
                        step()  # grads allocated, so the peak below is the step's own transient memory
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        y, saved = _saved_bytes(fwd, (lin.weight, g))
                        y.backward(dy)
                        torch.cuda.synchronize()
                        r[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                        r[f"{name}_saved_mib"] = saved / 2**20
                        del y
                    except Exception as e:
                        r[f"{name}_error"] = repr(e)[:300]
                        print("layer error", name, repr(e)[:300], flush=True)
                # the same steps replayed from CUDA graphs (engine.cuda_graph=true): GPU time only, the variants'
                # graphs replayed in shuffled rounds so that the GPU's clock drift does not bias the ratios
                r["graph_reps"] = max(6, args.reps // 2)
                r["graph_interleaved"] = "shuffled"
                graph_ms, graph_err = timed_gpu_interleaved(
                    {n: st for n, st in steps.items() if f"{n}_error" not in r}, 2, r["graph_reps"], inner=5)
                for name, ms in graph_ms.items():
                    r[f"{name}_graph_ms"] = ms
                for name, e in graph_err.items():
                    r[f"{name}_graph_error"] = e
                for name in variants:
                    if f"{name}_ms" in r:
                        r[f"{name}_speedup_vs_linear"] = r["linear_bf16_ms"] / r[f"{name}_ms"]
                    if f"{name}_graph_ms" in r and "linear_bf16_graph_ms" in r:
                        r[f"{name}_graph_speedup_vs_linear"] = r["linear_bf16_graph_ms"] / r[f"{name}_graph_ms"]
                rows.append(r)
                del x, lin, g, dy
    return rows


def to_markdown(res) -> str:
    out = [f"# Kernel benchmarks\n\nDevice: {res['device']}; date: {res['date']}; torch {res['torch']}, "
           f"triton {res['triton']}. Median of {res['reps']} timings after {res['warmup']} warm-ups (CUDA events).\n",
           "Kernel times (copy, fused kernel, GEMMs) are GPU times: 10 calls captured in a CUDA graph and replayed, "
           "so host launch overhead is not in them. Layer times are 10 forward+backward steps queued back to back "
           "as in training: there the host overhead counts wherever it exceeds the GPU time. The layer input's "
           "gradient is set to None before each backward (an activation's gradient is handed on, not accumulated, "
           "so no accumulation kernel over x.grad is in the times); the weights' gradients accumulate as over micro-batches.\n",
           f"Device-to-device copy (16384 x 8192 bf16): {res['copy']['tb_s']:.2f} TB/s (bytes read + written).\n",
           f"## Fused RMSNorm + Hadamard (block {res.get('hadamard_block', HB)}) + quantize (default launch config)\n",
           "`% of copy`: against the large copy above; `% same-size copy`: against a copy of the kernel's own "
           "input shape in the same run (same L2 effects). `1 call`: one call between two events, host included.\n",
           "`tensor-core kernel`: the flat kernel with the Hadamard as tensor-core products (the default before the "
           "warp-shuffle kernel), same run. `no Hadamard`: the same row length without the transform (RMSNorm + "
           "quantize, the QKV / fc1 inputs' kernel): the default (the warp-shuffle kernel, HB = 1) / the chunked "
           "kernel, % of copy.\n",
           "| tokens | dim | act bits | GPU ms | TB/s | % of copy | % same-size copy | 1 call ms | tensor-core kernel, % of copy "
           "| no Hadamard: default / chunked, % of copy |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["tokens"], r["dim"], r["act_bits"], r.get("variant")): r for r in res["fused"] if "ms" in r}
    nan = float("nan")
    for r in res["fused"]:
        if r.get("variant") == "default" and "ms" in r:
            k = (r["tokens"], r["dim"], r["act_bits"])
            t = by.get((*k, "tensor_core_flat"), {})
            nh = [by.get((*k, v), {}).get("pct_copy", nan) for v in ("no_hadamard", "no_hadamard_chunked")]
            out.append(f"| {r['tokens']} | {r['dim']} | {r['act_bits']} | {r['ms']:.3f} | {r['tb_s']:.2f} | "
                       f"{r['pct_copy']:.0f}% | {r.get('pct_same_size_copy', nan):.0f}% | "
                       f"{r.get('single_call_ms', nan):.3f} | {t.get('pct_copy', nan):.0f}% | "
                       f"{nh[0]:.0f}% / {nh[1]:.0f}% |")
    out += ["\n## Forward GEMM (TFLOP/s, GPU time; ratios against cuBLAS bf16 in the same run)\n",
            "| model | layer | tokens | K | N | bf16 | int8 Triton (A8) | torch._int_mm | FP8 (A4) | A8/bf16 | A4/bf16 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["gemm"]:
        out.append(f"| {r['model']} | {r['layer']} | {r['tokens']} | {r['K']} | {r['N']} | {r['bf16_tflops']:.0f} | "
                   f"{r['int8_tflops']:.0f} | {r.get('int_mm_tflops', float('nan')):.0f} | "
                   f"{r.get('fp8_tflops', float('nan')):.0f} | {r['int8_vs_bf16']:.2f} | "
                   f"{r.get('fp8_vs_bf16', float('nan')):.2f} |")
    names = ["linear_bf16", "rmsnorm_linear_bf16", "hbit_a8_bf16bwd", "hbit_a8_fp8bwd", "hbit_a4_bf16bwd",
             "hbit_a4_fp8bwd"]
    out += ["\n## One layer forward + backward (ms; speed-up against nn.Linear bf16)\n",
            "| model | layer | tokens | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in res["layer"]:
        cells = [f"{r[n + '_ms']:.2f} ({r[n + '_speedup_vs_linear']:.2f}x)" if n + "_ms" in r else "error"
                 for n in names]
        out.append(f"| {r['model']} | {r['layer']} | {r['tokens']} | " + " | ".join(cells) + " |")
    if any(n + "_graph_ms" in r for r in res["layer"] for n in names):
        r0 = next((r for r in res["layer"] if r.get("graph_interleaved")), res["layer"][0])
        out += ["\n## One layer forward + backward replayed from a CUDA graph (GPU ms; speed-up against nn.Linear bf16)\n",
                "5 steps captured in one graph and replayed (as with `engine.cuda_graph=true`, docs/training.md): no "
                "host time in either variant. The weight codes are reused from the step's first micro-batch as above."
                + (f" The variants' graphs are replayed in rounds, one replay of each per round in a new random order, "
                   f"median of {r0['graph_reps']} rounds: a drift of the GPU clock during the run moves every variant "
                   "alike, and no variant always follows the same one." if r0.get("graph_interleaved") == "shuffled" else
                   f" The variants' graphs are replayed round-robin in a fixed order, median of {r0['graph_reps']} "
                   "rounds." if r0.get("graph_interleaved") else "") + "\n",
                "| model | layer | tokens | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for r in res["layer"]:
            cells = [f"{r[n + '_graph_ms']:.2f} ({r[n + '_graph_speedup_vs_linear']:.2f}x)"
                     if n + "_graph_speedup_vs_linear" in r else "error" for n in names]
            out.append(f"| {r['model']} | {r['layer']} | {r['tokens']} | " + " | ".join(cells) + " |")
    like = [r for r in res["layer"] if r["layer"] in ("qkv", "fc1") and r.get("rmsnorm_linear_bf16_graph_ms")
            and r.get("graph_interleaved")]
    if like:
        hb = names[2:]
        out += ["\n## QKV / fc1 against what they replace: RMSNorm + Linear in bf16 (graph replays, speed-up)\n",
                "At the QKV / fc1 inputs the bf16 model has a pre-norm (torch's fused RMSNorm) before its Linear, which "
                "H-BitLinear's own RMSNorm replaces; at Wo / Wdown H-BitLinear's norm is an addition (the table "
                "above). Same run and graphs as above: `rmsnorm_linear_bf16` ms / variant ms.\n",
                "| model | layer | tokens | " + " | ".join(hb) + " |", "|---|---|---|" + "---|" * len(hb)]
        for r in like:
            cells = [f"{r['rmsnorm_linear_bf16_graph_ms'] / r[n + '_graph_ms']:.2f}x" if r.get(n + "_graph_ms")
                     else "error" for n in hb]
            out.append(f"| {r['model']} | {r['layer']} | {r['tokens']} | " + " | ".join(cells) + " |")
    out += ["\n## Memory saved for backward / step peak above the pre-step allocation (MiB)\n",
            "| model | layer | tokens | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in res["layer"]:
        cells = [f"{r[n + '_saved_mib']:.0f} / {r[n + '_peak_mib']:.0f}" if n + "_saved_mib" in r else "error"
                 for n in names]
        out.append(f"| {r['model']} | {r['layer']} | {r['tokens']} | " + " | ".join(cells) + " |")
    out += breakdown_markdown(res.get("breakdown", []), res["copy"]["tb_s"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--sweep", action="store_true", help="also sweep the fused kernel's launch configs")
    p.add_argument("--only", nargs="+", default=["fused", "gemm", "layer", "breakdown"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bitnet_dist.bench needs a CUDA device (none found); run it on the GPU machine.", file=sys.stderr)
        return 2
    import triton  # deferred: the benchmark checks for CUDA first

    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "triton": triton.__version__, "reps": args.reps, "warmup": args.warmup,
           "hadamard_block": HB, "tokens": args.tokens}
    res["copy"] = bench_copy(args)
    print(f"copy {res['copy']['tb_s']:.2f} TB/s", flush=True)
    res["fused"] = bench_fused(args, res["copy"]["tb_s"]) if "fused" in args.only else []
    for r in res["fused"]:
        print("fused", json.dumps(r), flush=True)
    res["gemm"] = bench_gemm(args) if "gemm" in args.only else []
    for r in res["gemm"]:
        print("gemm", json.dumps(r), flush=True)
    res["layer"] = bench_layer(args) if "layer" in args.only else []
    for r in res["layer"]:
        print("layer", json.dumps(r), flush=True)
    if "breakdown" in args.only:
        res["breakdown"] = bench_breakdown(args, res["copy"]["tb_s"], res["layer"],
                                           lambda fn: timed_gpu(fn, args.warmup, args.reps))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(res, indent=1))
    (args.out / "kernels.md").write_text(to_markdown(res))
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
