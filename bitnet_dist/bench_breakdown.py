"""Where one H-BitLinear training step's time goes, and the best speed-up its design allows (part of
``python -m bitnet_dist.bench``; the model below is CPU-tested, the timings need CUDA).

For every benchmarked layer shape each kernel that one forward + backward launches is timed alone (GPU time,
replayed from a CUDA graph) on the real operands. Each H-BitLinear variant is then a list of parts:

* GEMMs (forward int8 / FP8, backward bf16 or FP8): their measured times;
* memory-bound kernels (the fused norm / Hadamard / quantize, dequantizations, the FP8 casts of dy and of the
  saved codes, the fused backward, the weight-gradient accumulation): their measured times and the bytes
  they must move.

Three times per variant, each compared with nn.Linear bf16 replayed from a graph in the same run (the
layer table's number; the sum of its own kernels where that is missing):
* ``sum``: the parts back to back at their measured times (what the layer takes without launch gaps);
* ``floor``: the GEMMs as measured, every memory-bound part at the device-copy bandwidth: the best this
  decomposition can do with these GEMMs on this device;
* ``gemm``: the GEMMs alone, all other work free: the best any design built on these GEMMs can do.
A target above the ``gemm`` ratio cannot be met by better memory-bound kernels; well above the ``floor``
ratio, not by faster kernels of this decomposition (it would need fewer bytes moved, i.e. more fusion, or faster
GEMMs). ``floor`` is an estimate, not a hard bound: in a real step consecutive kernels find part of their input
in L2, and the layer replayed from a graph ran up to 7.5% faster than its floor on the H100 (docs/kernels.md). The FP8 backward GEMMs are also timed with cuBLASLt's fast accumulation (fewer accumulator bits,
not used: docs/kernels.md) to show what that option would be worth.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from bitnet_dist.bench_shapes import HB, MODELS, layer_shapes

VARIANTS = ("hbit_a8_bf16bwd", "hbit_a8_fp8bwd", "hbit_a4_bf16bwd", "hbit_a4_fp8bwd")
TARGETS = {"bf16bwd": 1.1, "fp8bwd": 1.4}  # the speed-up targets against nn.Linear bf16 (docs/kernels.md)


def part_bytes(T: int, K: int, N: int) -> Dict[str, Optional[int]]:
    """Bytes each kernel must read + write for x [T, K] -> y [T, N] (bf16 activations and gradients, 1-byte
    codes, fp32 scales); None marks a GEMM (timed, not modelled)."""
    return {
        "nhq_a8": 2 * T * K + T * K + 8 * T + 2 * K,  # x in; codes, scale, rstd out; norm weight
        "nhq_a4": 2 * T * K + T * K + 8 * T + 2 * K,
        "gemm_fwd_a8": None, "gemm_fwd_a4": None, "gemm_fwd_bf16": None,
        "w_dequant": N * K + 4 * N + 2 * N * K,       # ternary codes -> bf16 weight (bf16 backward's dgrad)
        "x_dequant": T * K + 4 * T + 2 * T * K,       # saved codes -> bf16 activation (bf16 backward's wgrad)
        "dgrad_bf16": None, "wgrad_bf16": None,
        "dy_fp8": 2 * T * N + 2 * T * N + 2 * T * N,  # dy read twice (amax, cast); two e4m3 copies written
        "codes_t": 2 * T * K,                         # saved codes -> e4m3 [K, T]
        "dgrad_fp8": None, "wgrad_fp8": None, "dgrad_fp8_fast": None, "wgrad_fp8_fast": None,
        "nhb": 3 * 2 * T * K + 4 * T,                 # grad_u and x in, grad_x out; rstd
        "w_accum": 3 * 2 * N * K,                     # weight.grad += grad_W (bf16): read both, write one
    }


def variant_parts(variant: str, *, fast_accum: bool = False) -> List[str]:
    """The kernels of one forward + backward step of ``variant`` (a name in VARIANTS or "linear_bf16")."""
    if variant == "linear_bf16":
        return ["gemm_fwd_bf16", "dgrad_bf16", "wgrad_bf16", "w_accum"]
    bits = 8 if "_a8_" in variant else 4
    fwd = [f"nhq_a{bits}", f"gemm_fwd_a{bits}"]
    if variant.endswith("fp8bwd"):
        sfx = "_fast" if fast_accum else ""
        return fwd + ["dy_fp8", "codes_t", "dgrad_fp8" + sfx, "wgrad_fp8" + sfx, "nhb", "w_accum"]
    return fwd + ["w_dequant", "dgrad_bf16", "x_dequant", "wgrad_bf16", "nhb", "w_accum"]


def bounds(parts_ms: Dict[str, float], T: int, K: int, N: int, copy_tb_s: float,
           linear_ms: Optional[float] = None, measured: Optional[Dict[str, float]] = None) -> Dict[str, dict]:
    """Per variant: sum / floor / gemm times (ms) and their speed-ups over nn.Linear (``linear_ms``, else the
    sum of nn.Linear's own parts); ``measured``: the layer table's graph times per variant, for comparison."""
    nbytes = part_bytes(T, K, N)
    lin_parts = variant_parts("linear_bf16")
    if linear_ms is None:
        linear_ms = sum(parts_ms[p] for p in lin_parts)
    out = {"linear_bf16": {"ms": linear_ms, "sum_ms": sum(parts_ms[p] for p in lin_parts)}}
    names = [(v, v, False) for v in VARIANTS] + [(v + "_fast_accum", v, True) for v in VARIANTS if "fp8" in v]
    for key, v, fast in names:
        parts = variant_parts(v, fast_accum=fast)
        if any(p not in parts_ms for p in parts):
            continue
        gemm = sum(parts_ms[p] for p in parts if nbytes[p] is None)
        mem_floor = sum(nbytes[p] for p in parts if nbytes[p] is not None) / (copy_tb_s * 1e9)
        row = {"sum_ms": sum(parts_ms[p] for p in parts), "floor_ms": gemm + mem_floor, "gemm_ms": gemm}
        for k in ("sum", "floor", "gemm"):
            row[f"{k}_ratio"] = linear_ms / row[f"{k}_ms"]
        if measured and measured.get(v):
            row["measured_ms"] = measured[v]
            row["measured_ratio"] = linear_ms / measured[v]
        out[key] = row
    return out


def _fp8_gemm_fast_accum(a8, b8, sa, sb):
    """``kernels.gemm.fp8_gemm`` with cuBLASLt's fast accumulation (fewer accumulator bits): measured here for
    comparison only; the layers never use it."""
    return torch._scaled_mm(a8, b8.t(), scale_a=sa.reshape(-1, 1).float(), scale_b=sb.reshape(1, -1).float(),
                            out_dtype=torch.bfloat16, use_fast_accum=True)


def bench_shapes(tokens) -> list:
    """(model, layer, K, N, hadamard, tokens) of bitnet_dist.bench's layer table."""
    return [(model, kind, K, N, had, T) for model, (h, f) in MODELS.items()
            for kind, K, N, had in layer_shapes(h, f) for T in tokens]


def bench_breakdown(args, copy_tb_s: float, layer_rows: list, timer: Callable, *, device: str = "cuda",
                    shapes: Optional[list] = None) -> list:
    """Times every part of ``part_bytes`` for each layer shape (default: bitnet_dist.bench's) with ``timer``
    (fn -> ms). CUDA in the benchmark; the CPU test runs it with TRITON_INTERPRET=1 at a tiny shape."""
    # deferred: the kernel modules import Triton; the byte model above runs without it
    from bitnet_dist.kernels.gemm import dy_fp8_both, fp8_available, fp8_gemm, fp8_transpose, int8_gemm
    from bitnet_dist.kernels.norm_hadamard_quant import norm_hadamard_backward, norm_hadamard_quant
    from bitnet_dist.kernels.ternary import dequantize_rows, quantize_weight

    layer_graph = {(r["model"], r["layer"], r["tokens"]): r for r in layer_rows}
    rows = []
    for model, kind, K, N, had, T in shapes or bench_shapes(args.tokens):
        hb = HB if had else 0
        x = torch.randn(T, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
        g = torch.ones(K, device=device, dtype=torch.bfloat16)
        dy = torch.randn(T, N, device=device, dtype=torch.bfloat16)
        fp8 = fp8_available(x.device)
        tw = quantize_weight(w, fp8=fp8)
        c8, s8, rstd = norm_hadamard_quant(x, g, act_bits=8, hadamard_block=hb, eps=1e-5)
        c4, s4, _ = norm_hadamard_quant(x, g, act_bits=4, hadamard_block=hb, eps=1e-5, fp8_codes=fp8)
        wdeq, xq = tw.dequantized(torch.bfloat16), dequantize_rows(c8, s8, torch.bfloat16)
        gacc = torch.zeros(N, K, device=device, dtype=torch.bfloat16)
        gw = dy.t() @ xq
        grad_u = dy @ wdeq
        fns = {
            "nhq_a8": lambda: norm_hadamard_quant(x, g, act_bits=8, hadamard_block=hb, eps=1e-5),
            "nhq_a4": lambda: norm_hadamard_quant(x, g, act_bits=4, hadamard_block=hb, eps=1e-5,
                                                  fp8_codes=fp8),
            "gemm_fwd_a8": lambda: int8_gemm(c8, tw.codes, s8, tw.scale),
            "gemm_fwd_bf16": lambda: x @ w.t(),
            "w_dequant": lambda: tw.dequantized(torch.bfloat16),
            "x_dequant": lambda: dequantize_rows(c8, s8, torch.bfloat16),
            "dgrad_bf16": lambda: dy @ wdeq,
            "wgrad_bf16": lambda: dy.t() @ xq,
            "nhb": lambda: norm_hadamard_backward(grad_u, x, g, rstd, hadamard_block=hb),
            "w_accum": lambda: gacc.add_(gw),
        }
        if fp8:
            ones = torch.ones(K, device=device, dtype=torch.float32)
            d8, sd, e8, se = dy_fp8_both(dy, tw.scale, s8)
            ct = fp8_transpose(c8)
            wt = tw.fp8_t()

            fns.update({
                "gemm_fwd_a4": lambda: fp8_gemm(c4, tw.fp8, s4, tw.scale),
                "dy_fp8": lambda: dy_fp8_both(dy, tw.scale, s8),
                "codes_t": lambda: fp8_transpose(c8),
                "dgrad_fp8": lambda: fp8_gemm(d8, wt, sd, ones),
                "wgrad_fp8": lambda: fp8_gemm(e8, ct, se, ones),
                "dgrad_fp8_fast": lambda: _fp8_gemm_fast_accum(d8, wt, sd, ones),
                "wgrad_fp8_fast": lambda: _fp8_gemm_fast_accum(e8, ct, se, ones),
            })
        else:
            fns["gemm_fwd_a4"] = lambda: int8_gemm(c4, tw.codes, s4, tw.scale)
        nbytes = part_bytes(T, K, N)
        parts = {}
        for name, fn in fns.items():
            try:
                parts[name] = timer(fn)
            except Exception as e:
                print("breakdown error", model, kind, T, name, repr(e)[:200], flush=True)
        lr = layer_graph.get((model, kind, T), {})
        measured = {v: lr[f"{v}_graph_ms"] for v in VARIANTS if f"{v}_graph_ms" in lr}
        row = {"model": model, "layer": kind, "tokens": T, "K": K, "N": N, "hadamard": had,
               "parts_ms": parts,
               "parts_pct_copy": {p: 100 * nbytes[p] / (ms * 1e9) / copy_tb_s for p, ms in parts.items()
                                  if nbytes[p] is not None and ms > 0},
               "bounds": bounds(parts, T, K, N, copy_tb_s, lr.get("linear_bf16_graph_ms"), measured)}
        rows.append(row)
        print("breakdown", model, kind, T, {k: round(v, 4) for k, v in parts.items()}, flush=True)
        del x, w, g, dy, tw, wdeq, xq, gacc, gw, grad_u, fns
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def to_markdown(rows: list, copy_tb_s: float) -> List[str]:
    """The breakdown's two tables (lines of markdown)."""
    if not rows:
        return []
    mem = ["nhq_a8", "nhq_a4", "w_dequant", "x_dequant", "dy_fp8", "codes_t", "nhb", "w_accum"]
    out = ["\n## Where the step's time goes, and the best speed-up this design allows (GPU ms)\n",
           "Each kernel of one forward + backward timed alone on the real operands (GPU time, CUDA graph), "
           f"memory-bound kernels with their % of the copy bandwidth ({copy_tb_s:.2f} TB/s). `nhq_a8` / "
           "`nhq_a4`: fused RMSNorm + Hadamard (Wo / Wdown; RMSNorm only at QKV / fc1) + INT8 / INT4 quantize; `w_dequant` / `x_dequant`: ternary weight / saved codes to bf16 "
           "(bf16 backward); `dy_fp8`: dy's two e4m3 casts (FP8 backward); `codes_t`: saved codes to e4m3, "
           "transposed; `nhb`: fused backward of the Hadamard and RMSNorm; `w_accum`: weight.grad += grad_W "
           "(both layers pay it). GEMMs in ms (`fast`: FP8 with cuBLASLt's fast accumulation, not used).\n",
           "| model | layer | tokens | " + " | ".join(mem) + " | fwd bf16 / A8 / A4 | dgrad bf16 / FP8 / fast | "
           "wgrad bf16 / FP8 / fast |", "|---|---|---|" + "---|" * (len(mem) + 3)]

    def ms(r, p, pct=False):
        v = r["parts_ms"].get(p)
        if v is None:
            return "-"
        return f"{v:.3f} ({r['parts_pct_copy'][p]:.0f}%)" if pct and p in r["parts_pct_copy"] else f"{v:.3f}"

    for r in rows:
        g3 = [" / ".join(ms(r, p) for p in ps) for ps in (("gemm_fwd_bf16", "gemm_fwd_a8", "gemm_fwd_a4"),
                                                          ("dgrad_bf16", "dgrad_fp8", "dgrad_fp8_fast"),
                                                          ("wgrad_bf16", "wgrad_fp8", "wgrad_fp8_fast"))]
        out.append(f"| {r['model']} | {r['layer']} | {r['tokens']} | " + " | ".join(ms(r, p, True) for p in mem)
                   + " | " + " | ".join(g3) + " |")
    out += ["\nSpeed-up over nn.Linear bf16 (its time replayed from a graph, the layer table's): `measured` (the "
            "layer table's graph replay) / `sum` (the parts back to back) / `floor` (GEMMs as measured, every other "
            "part at copy bandwidth) / `gemm` (GEMMs only, everything else free). Targets: "
            + ", ".join(f"{k} {v}x" for k, v in TARGETS.items()) + ". A target above `gemm` cannot be reached "
            "with these GEMMs; well above `floor`, not without moving fewer bytes (`floor` is an estimate: consecutive "
            "kernels reuse L2, and a layer can beat it by a few percent).\n",
            "| model | layer | tokens | " + " | ".join(VARIANTS) + " | FP8 bwd with fast accumulation: A8 / A4 floor |",
            "|---|---|---|" + "---|" * (len(VARIANTS) + 1)]
    for r in rows:
        b = r["bounds"]

        def cell(v):
            if v not in b:
                return "-"
            x = b[v]
            m = f"{x['measured_ratio']:.2f}" if "measured_ratio" in x else "-"
            return f"{m} / {x['sum_ratio']:.2f} / {x['floor_ratio']:.2f} / {x['gemm_ratio']:.2f}"

        fast = " / ".join(f"{b[v + '_fast_accum']['floor_ratio']:.2f}" if v + "_fast_accum" in b else "-"
                          for v in ("hbit_a8_fp8bwd", "hbit_a4_fp8bwd"))
        out.append(f"| {r['model']} | {r['layer']} | {r['tokens']} | " + " | ".join(cell(v) for v in VARIANTS)
                   + f" | {fast} |")
    return out
