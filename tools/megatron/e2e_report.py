"""bench.jsonl files (tools/megatron/gpu_check.py bench) -> docs/benchmarks/e2e.json and e2e.md.

    python tools/megatron/e2e_report.py A.jsonl:r5 B.jsonl:r6 [--docs docs/benchmarks]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


NOTES = [
    "Reading the table:",
    "",
    "* Ratios (`vs bf16`) compare rows of one bench command (same process, same micro x global batch).",
    "* At 2 x 2048 tokens per micro-batch the 1.3B v2 step is bound by host (CPU) time, not GPU time: a torch "
    "profile of one step (raw/round5_2026-11-24/C/profiles_mbs2) shows 406 ms of GPU kernels in a 0.69 s step for "
    "v2_a8 against 435 ms in 0.46 s for bf16; the H-BitLinear forward + backward costs ~1.5 ms of host time "
    "per call on this machine against ~0.25 ms for nn.Linear (tools/kernels/overhead.py), mostly Triton launch "
    "overhead. Larger micro-batches give the GPU enough work per launch: at 4 x 2048 and 8 x 2048 the v2 "
    "layers are faster than bf16 (1.09-1.15x). Runs: `r5` / `r6` with the final kernels before the host-overhead "
    "reduction (FastLaunch, docs/kernels.md), `r7` with it switched on (`BITNET_TRITON_FAST_LAUNCH=1`), `r8` with it on by "
    "default (session 4; raw outputs: docs/benchmarks/raw/round{5,6,7,8}_2026-11-24). At 2 x 2048 the host-bound "
    "v2 rows move with the host's speed from run to run (v2_a4 0.76x in r5, 0.88x in r7, 0.73x in r8 with v2_a8 at "
    "0.85x in r8): they are host-bound, not settled.",
    "* `r9` (session 5): the warp-shuffle Hadamard kernels (forward and backward, docs/kernels.md) as the default; "
    "raw docs/benchmarks/raw/round9_2026-11-24/e2e. The 2 x 2048 rows ran with the forward kernel only (before the "
    "warp-shuffle backward); so did a first 4 x 2048 run (v2_a8 1.11x, v2_a4 1.12x, e2e_mbs4_first.jsonl). The elementwise kernels are a few percent of the step, so the "
    "4 x 2048 ratios stay within the run-to-run spread of r5 / r8.",
    "* `r10` (session 6): the packed-register forward kernel (docs/kernels.md); raw "
    "docs/benchmarks/raw/round10_2026-11-24/e2e. 4 x 2048: v2_a8 1.14x, v2_a4 1.15x. 2 x 2048: v2_a8 0.93x, v2_a4 "
    "1.00x, the first run at parity there; the v2 step fell from 0.60-0.65 s (r9) to 0.46-0.49 s while bf16 moved "
    "by 6% (0.488 -> 0.457 s). The kernel change saves tens of microseconds of GPU time per layer call, not 0.15 s "
    "per step, so most of this is the host of this run (a host-bound regime, as above): one run, not a settled "
    "figure.",
    "* `r11` / `r11b` (session 7): r11 with the norm weight loaded in the forward tile's layout (docs/kernels.md) "
    "and the fused FP8 dy prep (not used by these bf16-backward runs); r11b also with the backward's new launch "
    "configuration (32 warps at 16384 features, the norm weight re-read per tile from 8192). Raw "
    "docs/benchmarks/raw/round11_2026-11-24/e2e. 4 x 2048: v2_a8 1.15x / 1.15x, v2_a4 1.14x / 1.17x. 2 x 2048 "
    "(host-bound): v2_a8 0.99x / 0.98x, v2_a4 0.88x / 0.99x. `r11-fp8`: the r11b code with "
    "`precision.fp8_backward=true` (`gpu_check.py bench --fp8-backward`; the bf16 row has no H-BitLinear and is "
    "unaffected): 4 x 2048 v2_a4 1.22x (48.8k tokens/s against 46.8k with bf16 backward GEMMs in r11b), v2_a8 1.15x "
    "(no gain; not investigated: its backward also converts the INT8 activation codes to e4m3 and transposes them "
    "on every call).",
    "* `r12` (session 8, eager) and `r12-graph` (the same code with `engine.cuda_graph=true`: every training step's "
    "forward and backward, all micro-batches, replayed as one CUDA graph captured after 2 eager steps; "
    "docs/training.md), one H100 session, raw docs/benchmarks/raw/round12_2026-11-24. The graph removes the host "
    "bound: at 2 x 2048 the v2 step falls from 0.585 s (v2_a8) / 0.452 s (v2_a4) eager to 0.404 / 0.398 s, bf16 from "
    "0.461 to 0.447 s, so v2_a8 1.11x and v2_a4 1.12x bf16 (eager, same session: 0.79x / 1.02x). At 4 x 2048: "
    "1.15x / 1.17x with the graph, 1.14x / 1.14x eager. Every timed step was a replay (`graph_replays` in the JSON). "
    "`r12-graph-fp8a` / `-fp8b`: with `precision.fp8_backward=true` as well, 4 x 2048: v2_a8 1.22x, v2_a4 1.25x "
    "(50.6k tokens/s). In fp8a v2_a4 ran out of memory: megatron-core's FullCudaGraphWrapper keeps the captured "
    "graph (and its memory pool) on its class, so the two earlier engines' pools were still held in that process; "
    "gpu_check.py now calls `engine.drop_cuda_graph()` between engines and fp8b measured bf16 and v2_a4 alone.",
    "* `r15` (session 12 of 2026-11-25, eager), `r15-graph` (`engine.cuda_graph=true`) and `r15-graph-fp8` (with "
    "`precision.fp8_backward=true` too): the code with the fused forward's register caps (session 11), one H100 "
    "session, raw docs/benchmarks/raw/round15_2026-11-25/e2e. 4 x 2048: v2_a8 1.13x / v2_a4 1.14x eager, 1.15x / "
    "1.17x with the graph, 1.21x / 1.24x with the graph and the FP8 backward; 2 x 2048 eager (host-bound) 0.82x / "
    "0.83x, with the graph 1.12x / 1.14x. The same picture as r12: the caps change a few microseconds per layer call. `r15b-graph` / "
    "`r15b-graph-fp8`: the final code of session 12 (the warp-shuffle kernels also at the QKV / fc1 inputs), 4 x "
    "2048 with the graph: v2_a8 1.17x, v2_a4 1.18x; with the FP8 backward 1.20x / 1.23x: within the run-to-run "
    "spread of r15 (by the breakdown's kernel times the change saves ~2.5 ms of GPU time in a 0.68 s step, 0.4%).",
    "* `r16-graph-fp8` (session 13 of 2026-11-25): the FP8 backward's dy prep with relaxed atomics in its amax pass "
    "(docs/kernels.md), 4 x 2048 with the graph and the FP8 backward: v2_a8 1.23x, v2_a4 1.22x (r15b: 1.20x / "
    "1.23x): within the run-to-run spread (by the breakdown's dy-prep times the change saves ~5 ms of GPU time in a "
    "0.66 s step, 0.8%); raw docs/benchmarks/raw/round16_2026-11-25/e2e_graph_fp8.jsonl.",
    "* **The bf16 baseline before session 13 of 2026-11-25 was slowed by its norms.** Every run above (r5-r16) "
    "gave the bf16 model the eager RMSNorm formula (fp32 copies, ~7 kernels forward and more backward: ~0.9 ms "
    "per norm and step at 8192 x 2048 on the H100, 49 norms per micro-batch at 1.3B), while the v2 models' norms "
    "run inside the fused kernels. `r16n` (eager), `r16n-graph` and `r16n-graph-fp8`: the bf16 model's norms on "
    "torch's fused RMSNorm (`bitnet_dist.norm.RMSNorm`, as megatron's TE / apex norms would be): the bf16 step at "
    "4 x 2048 falls from 0.806 s to 0.703 s, and v2_a8 / v2_a4 come to 0.97x / 0.96x eager, 1.01x / 1.02x with "
    "the CUDA graph, 1.07x / 1.10x with the graph and the FP8 backward. These are the honest end-to-end figures; "
    "the earlier rows compare against the slow baseline and overstate the v2 speed-up by ~15%; raw "
    "docs/benchmarks/raw/round16_2026-11-25/e2e_*_fusednorm*.jsonl.",
    "* **SwiGLU (session 14 of 2026-11-25).** Until then every model ran megatron's unfused SwiGLU (three torch "
    "ops on the strided halves of [gate | up], unvectorized; it keeps gate, up, silu(gate) and a copy of up): "
    "1.19 ms forward + backward per layer at 1.3B, 8192 tokens (tools/kernels/swiglu_probe.py), ~86 ms of a "
    "1.3B step at 4 x 2048. `r17a` (eager) / `r17a-graph`: the first fused form (the SwiGLU applied inside the "
    "Wdown H-BitLinear with the same torch ops, `precision.fused_swiglu`; `v2_a4:unfused` = off) against the bf16 "
    "model still on megatron's ops: the fused form saved 6.8 GiB of peak memory but cost 1-2% of the step "
    "(0.99x bf16 with the graph). `r17` / `r17-graph` / `r17-graph-fp8`: the SwiGLU on the new Triton kernels "
    "(kernels/swiglu.py, bit-identical to torch's CUDA ops) for every precision, the bf16 baseline included: "
    "the bf16 step falls from 0.703 to 0.650 s; v2_a4 is 1.00x eager, 1.02x with the graph, 1.09x with the graph "
    "and the FP8 backward (fused_swiglu on, the default); with it off 1.00x / 1.03x, 2.3 GiB more peak memory. "
    "`r17b` / `r17b-graph`: a repeat on a fresh machine, with v2_a8: eager v2_a8 0.96x, v2_a4 0.96x (r17: 1.005x; "
    "the eager v2 step is partly host-bound and moves with the host), with the graph 1.00x / 1.01x. "
    "Raw docs/benchmarks/raw/round17_2026-11-25/ (c2, c3: r17a; c5, c6: r17; c7: r17b).",
    "* **SwiGLU folded into the fused kernels (session 15 of 2026-11-25).** With `precision.fused_swiglu` the "
    "Wdown H-BitLinear's fused forward forms silu(gate) * up in registers from h (no product written or read), "
    "and its backward recomputes it and writes the gradient w.r.t. h directly (no SwiGLU recompute kernel, no "
    "x-gradient round trip, no separate SwiGLU backward), on launch configs of their own (docs/kernels.md). "
    "`r18` / `r18b` (eager), `r18-graph` / `r18b-graph`, `r18-graph-fp8` / `r18b-graph-fp8` (two H100 calls "
    "each): v2_a4 1.00x / 1.02x eager, 1.04x / 1.04x with the graph, 1.13x / 1.13x with the graph and the FP8 "
    "backward (session 14: 0.96-1.005x, 1.01-1.02x, 1.09x). The rows `v2_a4 (GLU_FOLD=0)` are the same code with "
    "`BITNET_GLU_FOLD=0` (the SwiGLU kernels composed with the plain kernels, as in session 14) in the same "
    "call (its bench label relabelled from `v2_a4` for this table; raw file unchanged): 0.95x eager, 1.02x "
    "with the graph. Peak memory unchanged (37.3-37.4 GiB). Raw docs/benchmarks/raw/round18_2026-11-25/ (c3: "
    "r18; c4: r18-graph*; c5: r18b; c6: r18b-graph*). Two more eager runs of the same code on fresh machines: "
    "`r18c` (c9) 0.98x, and `r18-prof` (c7: 3 timed steps, then one step under torch.profiler whose chrome trace "
    "tools/megatron/trace_gaps.py reads) 0.85x (v2 step 0.763 s against 0.642-0.666 s in the other three). So "
    "eagerly v2_a4 is 0.98-1.02x in three runs and not reliably at parity: the eager v2 step is partly bound by "
    "host time, which varies between machines. In the profiled step the GPU sat idle for 386 ms of 988 ms (bf16: "
    "45 of 669; the profiler slows the host too), 90 ms of it just before the fused forward kernels (median "
    "gap 295 us over 288 calls); tools/kernels/overhead.py (c8): one H-BitLinear forward + backward costs "
    "~0.97 ms of host time (forward alone 0.18 ms) against 0.22 ms for nn.Linear. The CUDA-graph step "
    "(`engine.cuda_graph=true`) removes it.",
    "* **Launch plans (session 16 of 2026-11-25).** The fused forward / backward reuse what a call signature's "
    "first call worked out, and the weight dequant / TMA int8 GEMM launch by a caller-built key "
    "(docs/kernels.md): one H-BitLinear forward + backward costs 0.80-0.87 ms of host time instead of 1.01-1.17 ms "
    "(-19% to -26%: A4, A8, SwiGLU-folded, no Hadamard; 1.22 against 1.32 ms with the FP8 backward, whose dy prep is "
    "not on plans; medians of three alternating rounds in one process, tools/kernels/host_breakdown.py; nn.Linear "
    "0.20 ms, an autograd Function that launches nothing 0.17 ms). At 4 x 2048 it changed nothing measurable: "
    "`r19a` (c3, the first version) v2_a4 1.007x eager; `r19b` (c4) v2_a4 1.013x, v2_a8 0.999x eager, and the same "
    "code with the plans off (`BITNET_LAUNCH_PLANS=0`, a second process on the same machine; rows relabelled "
    "`(plans off)`, raw file unchanged) 1.025x / 0.995x; `r19-graph` (c6) v2_a4 1.044x with the CUDA graph. So on "
    "these hosts the eager 4 x 2048 step was not bound by the layers' host time; the eager runs without the "
    "profiler (r18, r18b, r18c, r19a, r19b) give 0.98-1.02x against 1.04x with the graph. What the graph removes "
    "there was not measured this session (most likely the GPU's idle time between the v2 step's more numerous "
    "small kernels). `r19c` (c8, c9; one machine): 2 x 2048 tokens per micro-batch, the host-bound regime of "
    "r5-r15, eager, v2_a4 in processes of its own, the plans on and off alternating (three each): 0.398-0.403 s "
    "per step with the plans against 0.455-0.484 s without, 13% less, 0.94-0.95x the bf16 step (0.380 s) instead "
    "of 0.79-0.84x. In the bench process that ran bf16 first, v2_a4 (plans on) took 0.466 s (0.82x): why a "
    "preceding engine in the same process slows the host-bound v2 step was not investigated. Raw "
    "docs/benchmarks/raw/round19_2026-11-25/.",
    "* The 2026-11-24 morning rows (docs/benchmarks/raw/e2e_bench_2026-11-24.jsonl: 1.3B 1.00x, 400M 0.64-0.69x) "
    "ran with the stale ternary-code cache (codes computed once per run) and the older kernels; superseded.",
    "* 1.3B v2_a4 at 8 x 2048 ran out of memory in r6 after bf16 and v2_a8 had run in the same process (62-64 GiB "
    "peaks); measured alone in r8: 50.2k tokens/s, 1.15x the r6 bf16 row (43.8k; ratio across two runs), 63.5 GiB peak.",
    "* **Per-step weight quantization in three kernels, and megatron's grad norm without host syncs (session 17 of "
    "2026-11-25).** What the CUDA graph removed was measured: one more step traced with CUDA activity only "
    "(`gpu_check.py bench --profile-cuda`: no CPU-op recording, so the host runs near its own speed) and split by "
    "phase (tools/megatron/trace_gaps.py `idle_by_phase`). In `r20-before` (c1, the code of session 16) the GPU idled "
    "83 ms of a 690 ms v2_a4 step against 28 of 654 for bf16, and 58 of those 83 ms fell in the first micro-batch's "
    "forward (bf16: 6 ms; every other phase within 1 ms of bf16). That forward quantizes every weight of the step: 72 "
    "weights x ~13 small kernels (row abs-sums, torch ops for the segment statistic, codes), queued by the host while "
    "the GPU waited. The weight quantization is now three keyed kernel launches per weight, no torch op between "
    "them (kernels/ternary.py; docs/kernels.md): for the 72 weights of the 1.3B model, 8.0 ms of host time against "
    "26.7 ms (A8; 8.4 against 28.3 ms A4 with the FP8 codes) and 3.5 against 5.2 ms of GPU time "
    "(tools/kernels/weight_quant_host.py, c2). The first forward's idle time fell to 24 ms (r20b, c3). And without "
    "Transformer Engine or apex, megatron's grad-norm fallback synced the host once per gradient tensor (147 per v2 "
    "step, 111 for bf16; `--sync-debug`): torch._foreach_norm / _foreach_mul_ replace it (bitnet_dist/compat.py; "
    "3 syncs per step remain: megatron's token count, the loss, the norm), from r20d on. Eager v2_a4 at 4 x 2048: "
    "`r20b` (c3; bf16 and v2_a4 each in a process of its own, same machine) 1.044x; `r20c` (c4, one process) "
    "1.033x, `r20c-gcoff` (Python's cyclic GC off over the timed steps: not a factor) 1.037x; `r20d` (c5, with the "
    "foreach grad norm) 1.030x; `r20e` (c7, the final code) v2_a4 1.041x, v2_a8 1.023x. `r20a` (c2, the first "
    "process on a fresh machine) 0.955x: its v2 step took 0.680 s, every part of it (schedule and optimizer) slower "
    "than in the two processes after it on the same machine (`r20a-alone`: v2_a4 0.636 s, and 0.644 s with the "
    "composed weight quantization, rows relabelled; ratios there against the bf16 row of the first process); not "
    "explained. `r20b-twice` (c3): v2_a4 twice in one process, 0.641 / 0.638 s (a preceding engine does not slow the "
    "next). With the CUDA graph: `r20-before-graph` 1.039x, `r20-graph` (c6) 1.044x. Raw "
    "docs/benchmarks/raw/round20_2026-11-25/.",
    "* `r21*` (session 18 of 2026-11-25): all of a rank's ternary weights quantized in one pass per step "
    "(kernels/ternary.py `WeightBatch`, docs/kernels.md \"All weights in one pass\"); `v2_a4@nobatch` is the same "
    "code with the batch off (the per-weight quantization of session 17). `r21-ab1` / `r21-ab2` (c2): one process, "
    "bf16, v2_a4, v2_a4@nobatch, then bf16, v2_a4@nobatch, v2_a4 (`gpu_check.py bench --precision ...`, 8 timed "
    "steps each; each triple's ratios against its own bf16 row): v2_a4 1.037x / 1.039x with the batch, 1.031x / "
    "1.038x without. The first micro-batch's forward idled 2.6 / 6.3 ms with the batch, 13.1 / 6.6 ms without (bf16 "
    "1.3 / 1.4). `r21c1` / `r21c1-nobatch` (c1): separate processes on a slower host, 1.000x / 1.011x (a cross-process "
    "comparison; there the first forward idled 6.3 ms with the batch against 27.7 ms without). `r21-graph` (c3): "
    "with the CUDA graph 1.044x. `r21-ab3` (c4, another machine, one process: v2_a4@nobatch, bf16, v2_a4, "
    "v2_a4@nobatch, v2_a4, bf16): 1.032x with and without the batch (ratios against the one bf16 row that ran); the "
    "last bf16 engine ran out of memory, the leak of the batch's first version (each layer's FP8 callable held the "
    "layer; with megatron DDP's hooked AccumulateGrad nodes the cycle was not collected, so every deleted engine "
    "stayed allocated), fixed since (weak references; docs/kernels.md). The peak memory of the later rows of r21-ab1 / -ab2 (61-62 GiB) includes what the "
    "earlier engines of that process left allocated (the leak); the first v2_a4 row, with the batch, peaks at 37.3 GiB as "
    "without it (r20). Raw docs/benchmarks/raw/round21_2026-11-25/.",
]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("bench", nargs="+", help="bench.jsonl files, each optionally FILE:run-label")
    p.add_argument("--docs", default="docs/benchmarks")
    p.add_argument("--keep", action="store_true", help="start from the rows already in DOCS/e2e.json")
    a = p.parse_args(argv)
    rows = []
    if a.keep and (Path(a.docs) / "e2e.json").is_file():
        rows = json.loads((Path(a.docs) / "e2e.json").read_text())["rows"]
    for spec in a.bench:  # FILE or FILE:run-label
        path, _, label = spec.partition(":")
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append({**json.loads(line), "run": label or Path(path).parent.name})
    ok = [r for r in rows if "error" not in r]
    meta = {k: ok[0][k] for k in ("device", "date", "torch")} if ok else {}

    def group(r):
        return (r["run"], r["model"], r.get("mbs"), r.get("gbs"))

    base = {group(r): r["tokens_per_s"] for r in ok if r["precision"] == "bf16"}
    for r in ok:
        r["speed_vs_bf16"] = r["tokens_per_s"] / base[group(r)] if group(r) in base else None
    out = Path(a.docs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# End-to-end training throughput, megatron engine, one GPU",
        "",
        f"Device: {meta.get('device', '?')}; date {meta.get('date', '?')}; torch {meta.get('torch', '?')}. "
        "Engine `megatron` (megatron DDP + distributed optimizer, bf16 weights with fp32 main weights and "
        "fp32 gradient reduction), TP=PP=DP=1, synthetic tokens (Markov text over a 32,000-token "
        "vocabulary, `--vocab`), Triton kernels where the layers use them (`precision.kernels=auto`). Time per optimizer step = mean over the timed steps after warm-up steps.",
        "MFU = model FLOPs per token (6 x matmul parameters + 12 L s h attention + 6 h V logits, megatron's "
        "convention; the same count for every precision) x tokens/s / 989.4 TFLOP/s (H100 SXM dense bf16).",
        "",
        "| run | model | precision | kernels | step | seq | micro x global batch | step (s) | tokens/s | TFLOP/s | MFU | vs bf16 | peak mem (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            what = r["error"] if r["error"].startswith("not measured") else f"failed: {r['error'][:80]}"
            lines.append(f"| {r['run']} | {r['model']} | {r['precision']} | - | - | - | - | {what} | | | | | |")
            continue
        vs = f"{r['speed_vs_bf16']:.2f}x" if r.get("speed_vs_bf16") else "-"
        step = ("CUDA graph" if r.get("cuda_graph") else "eager") + (", FP8 bwd" if r.get("fp8_backward") and r["precision"] != "bf16" else "")
        lines.append(f"| {r['run']} | {r['model']} | {r['precision']} | {r['kernels']} | {step} | {r['seq']} | "
                     f"{r['mbs']} x {r['gbs']} | "
                     f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | {vs} | "
                     f"{r['peak_mem_gib']:.1f} |")
    lines += ["", *NOTES]
    cmds = sorted({r.get("command", "") for r in rows if r.get("command")})
    lines += ["", "Commands (device machine, repo root, wheels on PYTHONPATH):", ""]
    lines += [f"    python {c}" for c in cmds]
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
