"""The benchmark's markdown rendering (CPU): every measured row appears with its ratios; failures say so."""
import pytest

from bitnet_dist import bench


def test_markdown_renders_rows_and_errors():
    res = {"device": "GPU X", "date": "2026-11-24", "torch": "t", "triton": "tr", "reps": 3, "warmup": 1,
           "hadamard_block": 256, "copy": {"tb_s": 3.0},
           "fused": [{"tokens": 8192, "dim": 2048, "act_bits": 8, "variant": "default", "ms": 0.05, "tb_s": 1.2,
                      "pct_copy": 40.0, "pct_same_size_copy": 41.0, "single_call_ms": 0.12},
                     {"tokens": 8192, "dim": 2048, "act_bits": 8, "variant": "other", "ms": 9.0, "tb_s": 0.1,
                      "pct_copy": 1.0},
                     {"tokens": 8192, "dim": 2048, "act_bits": 8, "variant": "no_hadamard", "ms": 0.03, "tb_s": 2.1,
                      "pct_copy": 70.0},
                     {"tokens": 8192, "dim": 2048, "act_bits": 8, "variant": "no_hadamard_chunked", "ms": 0.05,
                      "tb_s": 1.5, "pct_copy": 50.0}],
           "gemm": [{"model": "1.3B", "layer": "wo", "tokens": 8192, "K": 2048, "N": 2048, "bf16_tflops": 700.0,
                     "int8_tflops": 1000.0, "fp8_tflops": 1200.0, "int8_vs_bf16": 1.43, "fp8_vs_bf16": 1.71}],
           "layer": [{"model": "1.3B", "layer": "wo", "tokens": 8192, "linear_bf16_ms": 0.5,
                      "linear_bf16_speedup_vs_linear": 1.0, "linear_bf16_saved_mib": 32, "linear_bf16_peak_mib": 72}]}
    md = bench.to_markdown(res)
    assert "| 8192 | 2048 | 8 | 0.050 | 1.20 | 40% | 41% | 0.120 | nan% | 70% / 50% |" in md
    assert "other" not in md and "9.000" not in md  # only the default launch config is tabulated
    assert "| 1.3B | wo | 8192 | 2048 | 2048 | 700 | 1000 | nan | 1200 | 1.43 | 1.71 |" in md
    assert "0.50 (1.00x)" in md and "| error |" in md  # a variant without a number is shown as an error


def test_markdown_graph_table_only_when_measured():
    base = {"device": "GPU X", "date": "d", "torch": "t", "triton": "tr", "reps": 3, "warmup": 1, "copy": {"tb_s": 3.0},
            "fused": [], "gemm": []}
    row = {"model": "1.3B", "layer": "wo", "tokens": 8192, "linear_bf16_ms": 0.5, "linear_bf16_speedup_vs_linear": 1.0}
    assert "replayed from a CUDA graph" not in bench.to_markdown({**base, "layer": [row]})
    row = {**row, "linear_bf16_graph_ms": 0.4, "linear_bf16_graph_speedup_vs_linear": 1.0,
           "hbit_a8_bf16bwd_graph_ms": 0.32, "hbit_a8_bf16bwd_graph_speedup_vs_linear": 1.25}
    md = bench.to_markdown({**base, "layer": [row]})
    assert "replayed from a CUDA graph" in md and "0.40 (1.00x)" in md and "0.32 (1.25x)" in md
    assert "what they replace" not in md  # Wo: no like-for-like table
    qkv = {**row, "layer": "qkv", "graph_interleaved": "shuffled", "graph_reps": 15, "rmsnorm_linear_bf16_graph_ms": 0.48}
    md = bench.to_markdown({**base, "layer": [row, qkv]})
    assert "what they replace" in md and "| 1.3B | qkv | 8192 | 1.50x | error |" in md  # 0.48 / 0.32
    assert "median of 15 rounds" in md


def test_fp8_loss_study_pairs_runs_by_seed(tmp_path):
    """tools/fp8_loss_study.py summarize: pairs the bf16-backward / FP8-backward runs of each seed from their
    metrics.jsonl, reports the final validation losses' relative difference, a step-1 mismatch and the curves'
    largest gap; a run without its partner is left out."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "fp8_loss_study", Path(__file__).resolve().parents[2] / "tools" / "fp8_loss_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def write(name, losses, vals, gnorms=None):
        d = tmp_path / name
        d.mkdir()
        recs = [{"step": 0, "event": "start"}] + [{"step": 10 * (i + 1), "loss": v,
                                                    **({"grad_norm": gnorms[i]} if gnorms else {})}
                                                   for i, v in enumerate(losses)]
        recs += [{"step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(vals)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    write("v2_a4_s1_bf16bwd", [7.0, 5.0, 4.0], [5.0, 4.0], gnorms=[2.0, 1.0, 0.5])
    write("v2_a4_s1_fp8bwd", [7.0, 5.5, 4.0], [5.1, 4.02], gnorms=[2.0, 1.5, 0.45])
    write("v2_a4_s2_bf16bwd", [7.1, 5.0, 4.0], [5.0, 4.1])
    write("v2_a4_s2_fp8bwd", [7.2, 5.0, 4.0], [5.0, 4.1])  # step 1 differs
    write("v2_a8_s1_bf16bwd", [7.0], [6.0])  # no FP8 partner
    res = mod.summarize_dir(tmp_path)
    assert [(s["precision"], s["seed"]) for s in res["seeds"]] == [("v2_a4", 1), ("v2_a4", 2)]
    s1, s2 = res["seeds"]
    assert s1["first_loss_equal"] and not s2["first_loss_equal"]
    assert abs(s1["final_val_rel_diff"] - 0.005) < 1e-12 and s2["final_val_rel_diff"] == 0.0
    assert abs(s1["max_rel_gap_smoothed_train"] - 0.25 / 6.0) < 1e-12  # smoothed: (7 + 5.5) / 2 vs (7 + 5) / 2
    assert abs(res["final_val_rel_diff_max_abs"] - 0.005) < 1e-12
    assert abs(res["seed_spread_bf16bwd_rel"] - 0.1 / 4.05) < 1e-12
    assert s1["grad_norm_ratio_median"] == pytest.approx(1.0) and s1["grad_norm_ratio_first10_median"] == \
        pytest.approx(1.0)  # ratios 1.0, 1.5, 0.9
    assert s2["grad_norm_ratio_median"] is None and s1["first_step"] == 10
    md = mod.to_markdown(res)
    assert "| v2_a4 | 1 | 30 | step 10: yes | 4.0000 | 4.0200 | +0.50% | 4.17% | 1.000; 1.000 |" in md
    assert "| v2_a4 | 2 | 30 | step 10: no |" in md and "20: 4.000 / 4.020" in md
    cmd = mod.train_command(tmp_path / "r", model="25M", precision="v2_a4", steps=2000, seed=1, fp8="true")
    assert "trainer.log_interval=1" in cmd and "precision.fp8_backward=true" in cmd


def test_breakdown_bytes_are_the_kernels_minimum_traffic():
    """Hand count for x [8, 16] -> y [8, 32]: bf16 = 2 B, codes 1 B, fp32 scales 4 B."""
    from bitnet_dist.bench_breakdown import part_bytes, variant_parts

    b = part_bytes(8, 16, 32)
    assert b["nhq_a8"] == 8 * 16 * 2 + 8 * 16 + 8 * (4 + 4) + 16 * 2  # x in, codes + scale + rstd out, g in
    assert b["dy_fp8"] == 2 * (8 * 32 * 2) + 2 * (8 * 32)  # dy read twice, two e4m3 copies written
    assert b["nhb"] == 3 * 8 * 16 * 2 + 8 * 4 and b["w_accum"] == 3 * 32 * 16 * 2
    assert b["codes_t"] == 2 * 8 * 16 and b["x_dequant"] == 8 * 16 * 3 + 8 * 4
    assert all(b[p] is None for p in ("gemm_fwd_a8", "dgrad_fp8", "wgrad_bf16"))
    # every part a variant names is modelled (a GEMM or a byte count), and the variants differ where they should
    for v in ("linear_bf16", "hbit_a8_bf16bwd", "hbit_a4_fp8bwd"):
        assert all(p in b for p in variant_parts(v)) and all(p in b for p in variant_parts(v, fast_accum=True))
    assert variant_parts("hbit_a4_fp8bwd")[:2] == ["nhq_a4", "gemm_fwd_a4"]
    assert "dgrad_fp8_fast" in variant_parts("hbit_a8_fp8bwd", fast_accum=True)
    assert "w_accum" in variant_parts("linear_bf16") and "w_accum" in variant_parts("hbit_a8_bf16bwd")


def test_breakdown_bounds_arithmetic():
    from bitnet_dist.bench_breakdown import bounds, part_bytes

    T, K, N, copy = 64, 128, 256, 2.0  # TB/s
    nb = part_bytes(T, K, N)
    ms = {p: (0.5 if b is None else 0.1) for p, b in nb.items()}
    ms["dgrad_fp8_fast"] = ms["wgrad_fp8_fast"] = 0.25
    del ms["wgrad_fp8"]  # a part that failed to run: its variant has no bound
    b = bounds(ms, T, K, N, copy, linear_ms=2.0, measured={"hbit_a8_bf16bwd": 1.6})
    a8 = b["hbit_a8_bf16bwd"]  # nhq, fwd GEMM, w_dequant, dgrad, x_dequant, wgrad, nhb, w_accum
    assert abs(a8["sum_ms"] - (3 * 0.5 + 5 * 0.1)) < 1e-12 and abs(a8["gemm_ms"] - 1.5) < 1e-12
    mem = nb["nhq_a8"] + nb["w_dequant"] + nb["x_dequant"] + nb["nhb"] + nb["w_accum"]
    assert abs(a8["floor_ms"] - (1.5 + mem / 2e9)) < 1e-15
    assert abs(a8["gemm_ratio"] - 2.0 / 1.5) < 1e-12 and abs(a8["measured_ratio"] - 1.25) < 1e-12
    assert a8["gemm_ratio"] >= a8["floor_ratio"]
    assert "hbit_a8_fp8bwd" not in b and "hbit_a4_fp8bwd" not in b  # wgrad_fp8 missing
    fast = b["hbit_a8_fp8bwd_fast_accum"]
    assert abs(fast["gemm_ms"] - (0.5 + 0.25 + 0.25)) < 1e-12
    # no nn.Linear time from the layer table: the sum of its own parts (3 GEMMs + the accumulation)
    assert abs(bounds(ms, T, K, N, copy)["linear_bf16"]["ms"] - 1.6) < 1e-12


def test_breakdown_markdown():
    from bitnet_dist.bench_breakdown import bounds, part_bytes, to_markdown

    nb = part_bytes(64, 128, 256)
    ms = {p: (0.5 if b is None else 0.1) for p, b in nb.items()}
    row = {"model": "1.3B", "layer": "wo", "tokens": 64, "parts_ms": ms,
           "parts_pct_copy": {p: 50.0 for p, b in nb.items() if b is not None},
           "bounds": bounds(ms, 64, 128, 256, 2.0, linear_ms=2.0)}
    md = "\n".join(to_markdown([row], 2.0))
    assert "| 1.3B | wo | 64 | 0.100 (50%) |" in md
    a8 = row["bounds"]["hbit_a8_bf16bwd"]
    assert f"- / {a8['sum_ratio']:.2f} / {a8['floor_ratio']:.2f} / {a8['gemm_ratio']:.2f}" in md
    assert to_markdown([], 2.0) == []


def test_interleaved_medians_rounds_and_drift():
    """The layer table's graph timings are taken in rounds, each a new (seeded) order of every variant: with a
    clock that drifts during the run, two equal variants get about equal medians (timed one after the other, the
    later one would look 1% slower per timing), and no variant always follows the same other one."""
    from bitnet_dist.bench import interleaved_medians

    names = ["a", "b", "c", "slow"]
    order, clock = [], [1.0]

    def run_once(name):
        order.append(name)
        clock[0] *= 1.002  # every timing 0.2% slower than the one before (a warming GPU)
        return clock[0] * (2.0 if name == "slow" else 1.0)

    reps = 40
    ms = interleaved_medians(run_once, names, reps=reps)
    rounds = [order[i * 4:(i + 1) * 4] for i in range(reps)]
    assert all(sorted(r) == sorted(names) for r in rounds)  # one timing of each per round
    predecessors = {(r[i - 1], r[i]) for r in rounds for i in range(1, 4) if r[i] == "a"}
    assert len(predecessors) == 3  # "a" follows each of the others at some point
    for x in ("b", "c"):
        assert abs(ms["a"] / ms[x] - 1) < 0.01, ms  # sequential timing would give 10 rounds' drift: ~8%
    assert abs(ms["slow"] / ms["a"] - 2) < 0.05
    # the same seed, the same orders (runs are comparable)
    order.clear()
    interleaved_medians(run_once, names, reps=reps)
    order2 = list(order)
    order.clear()
    interleaved_medians(run_once, names, reps=reps)
    assert order == order2
    assert interleaved_medians(run_once, [], reps=3) == {}


def test_saved_memory_attributes_storages_by_module():
    """tools/megatron/saved_memory.py: each storage autograd keeps is counted once, under the innermost module
    that saved it; a storage saved by two modules is `shared`; parameters are not counted."""
    import importlib.util
    from pathlib import Path

    import torch

    spec = importlib.util.spec_from_file_location(
        "saved_memory", Path(__file__).resolve().parents[2] / "tools" / "megatron" / "saved_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Producer(torch.nn.Module):  # keeps its output (exp's backward needs it)
        def forward(self, x):
            return torch.exp(x)

    class Consumer(torch.nn.Module):  # keeps its input (a view of the producer's output) and its own square
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(8))

        def forward(self, y):
            v = y.view(4, 8)
            return (v * self.w).pow(2).sum()

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.producer, self.consumer = Producer(), Consumer()

        def forward(self, x):
            return self.consumer(self.producer(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Layer()
            self.x = torch.nn.Parameter(torch.randn(32))

        def forward(self, input_ids, position_ids, attention_mask, labels):
            return self.layer(self.x * 1.0)

    r = mod.layer_saved(Model(), torch.zeros(1, 4, dtype=torch.long), "layer")
    f32 = 32 * 4
    assert r["shared"] == {"producer": f32, "consumer": f32}  # exp's output = the consumer's input, one storage
    assert r["own"] == {"consumer": f32}  # pow's input v * w; mul's other input w is a parameter: not counted
    assert r["total_bytes"] == 2 * f32


def test_trace_gaps_finds_idle_gpu_and_the_cpu_ops_across_it(tmp_path):
    """tools/megatron/trace_gaps.py on a synthetic chrome trace: busy time is the union of overlapping kernels,
    idle gaps below the threshold are counted in idle time but not listed, and the largest gap names the kernels
    around it and the CPU ops running across it."""
    import gzip
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "trace_gaps", Path(__file__).resolve().parents[2] / "tools" / "megatron" / "trace_gaps.py")
    tg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tg)
    k = lambda n, ts, dur: {"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": dur}  # noqa: E731
    ev = [k("a", 0, 100), k("b", 50, 100),  # overlap: busy 0-150
          k("c", 160, 40),  # 10 us gap (below 20)
          k("d", 500, 100),  # 300 us gap after c
          {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 210, "dur": 250},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 600, "dur": 5}]
    p = tmp_path / "t.trace.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    r = tg.gaps(tg.load(str(p)), top=5, min_us=20.0)
    assert r["span_ms"] == 0.6 and abs(r["gpu_busy_ms"] - 0.29) < 1e-9 and abs(r["gpu_idle_ms"] - 0.31) < 1e-9
    assert r["n_gaps"] == 1
    (g,) = r["top"]
    assert g["gap_us"] == 300 and g["after_kernel"] == "c" and g["before_kernel"] == "d"
    assert g["cpu_ops"] == ["aten::item x1"]
    assert r["idle_before_kernel_ms"] == {"d": 0.3}
    # by phase: attention forward / backward kernels and the optimizer's multi-tensor kernels mark the phases
    ph = [k("prep", 0, 10), k("sdpa_fprop", 30, 10), k("gemm", 40, 10), k("gemm", 90, 10),  # 1F: idle 40
          k("sdpa_bprop", 100, 20), k("gemm", 125, 5),  # 2B: idle 5
          k("sdpa_fprop", 130, 10), k("multi_tensor_apply_kernel", 200, 10)]  # 3F: 0; 4O: idle 60
    assert tg.idle_by_phase(ph) == [
        {"phase": "0", "span_ms": 0.01, "idle_ms": 0.0, "kernels": 1},
        {"phase": "1F", "span_ms": 0.07, "idle_ms": 0.06, "kernels": 3},
        {"phase": "2B", "span_ms": 0.03, "idle_ms": 0.005, "kernels": 2},
        {"phase": "3F", "span_ms": 0.01, "idle_ms": 0.0, "kernels": 1},
        {"phase": "4O", "span_ms": 0.01, "idle_ms": 0.06, "kernels": 1}]
