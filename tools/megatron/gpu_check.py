"""GPU checks of the megatron engine (run on the device machine; see docs/megatron.md).

    python tools/megatron/gpu_check.py curve --engine megatron --model tiny --steps 50 --out X.json
    python tools/megatron/gpu_check.py compare A.json B.json          # first loss, max relative gap
    torchrun --nproc_per_node 4 tools/megatron/gpu_check.py tp --out X.json   # gloo, one GPU, model level
    torchrun --nproc_per_node 4 tools/megatron/gpu_check.py curve --engine megatron --tp 2 --pp 2 --vp 2 --sp \
        --dtype fp32 --models small --gbs 16 --mbs 2 --save-at 25 --save-dir /tmp/ck --out X.json   # 4+ GPUs
    python tools/megatron/gpu_check.py curve --engine megatron --dtype fp32 --models small --gbs 16 --mbs 2 \
        --load /tmp/ck --out Y.json                        # continue the TP2xPP2 run at TP1xPP1
    python tools/megatron/gpu_check.py bench --model 400M --precision bf16 v2_a8 v2_a4 --out X.json

``curve`` trains one engine (megatron, deepspeed, or ``reference``: a plain single-process loop over
build_model with torch AdamW, no megatron wrappers) on deterministic synthetic text with a learnable
structure (a sparse random Markov chain), so the losses fall and the curves can be compared.
The same (seed, step, micro-batch) gives the same tokens in every engine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(k, v)

H100_BF16_DENSE = 989.4e12  # FLOP/s, H100 SXM5 dense bf16 (NVIDIA datasheet)


# -- synthetic, learnable text ---------------------------------------------------------------------------------
class MarkovText:
    """Tokens from a fixed random Markov chain: each token has ``fanout`` likely successors (80%) and
    otherwise a uniform one, so the achievable loss is far below log(vocab)."""

    def __init__(self, vocab: int, seed: int = 0, fanout: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.succ = torch.randint(0, vocab, (vocab, fanout), generator=g)
        self.seed = seed

    def batch(self, step: int, micro: int, mbs: int, seq: int, split: str = "train") -> dict:
        # arithmetic, not hash(): str hashing is salted per process (PYTHONHASHSEED), and every rank and
        # every engine's process must draw the same tokens
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 10_007 + micro) * 2 + (split == "valid"))
        n = seq + 1
        toks = torch.empty(mbs, n, dtype=torch.int64)
        toks[:, 0] = torch.randint(0, self.vocab, (mbs,), generator=g)
        pick = torch.randint(0, self.succ.shape[1], (mbs, n), generator=g)
        jump = torch.rand(mbs, n, generator=g) < 0.2
        rnd = torch.randint(0, self.vocab, (mbs, n), generator=g)
        for i in range(1, n):
            nxt = self.succ[toks[:, i - 1], pick[:, i]]
            toks[:, i] = torch.where(jump[:, i], rnd[:, i], nxt)
        return {"tokens": toks[:, :-1].contiguous(), "labels": toks[:, 1:].contiguous(),
                "loss_mask": torch.ones(mbs, seq, dtype=torch.float32)}


def make_cfg(a):
    from bitnet_dist.config import TrainConfig
    from bitnet_dist.presets import model_preset, precision_preset

    cfg = TrainConfig()
    over = {}
    if a.layers:
        over["num_layers"] = a.layers
    cfg.model = model_preset(a.model, **over)
    spec = a.precision if isinstance(a.precision, str) else a.precision[0]
    name, _, flag = spec.partition(":")  # "v2_a4:unfused": precision.fused_swiglu=false
    cfg.precision = precision_preset(name, fused_swiglu=(flag != "unfused"))
    if getattr(a, "kernels", None):
        cfg.precision.kernels = a.kernels
    if getattr(a, "fp8_backward", False):
        cfg.precision.fp8_backward = True
    if getattr(a, "cuda_graph", False):
        cfg.engine.cuda_graph = True
    cfg.engine.name = a.engine if getattr(a, "engine", "megatron") != "reference" else "megatron"
    cfg.parallel.tensor = getattr(a, "tensor", 1)
    cfg.parallel.pipeline = getattr(a, "pipeline", 1)
    cfg.parallel.virtual_pipeline = getattr(a, "virtual", None)
    cfg.parallel.sequence = getattr(a, "sp", False)
    cfg.trainer.seq_length = a.seq
    cfg.trainer.micro_batch_size = a.mbs
    cfg.trainer.global_batch_size = a.gbs
    cfg.trainer.dtype = a.dtype
    cfg.trainer.seed = a.seed
    cfg.optim.lr = a.lr
    cfg.optim.weight_decay = 0.1
    cfg.model.max_sequence_length = max(cfg.model.max_sequence_length, a.seq)
    return cfg


def lr_at(step: int, peak: float, warmup: int = 5) -> float:
    return peak * min(1.0, (step + 1) / warmup)


# -- curve -----------------------------------------------------------------------------------------------------
def reference_curve(cfg, data, steps, vocab):
    """Plain loop: build_model (same init), torch AdamW on fp32 weights, bf16 autocast when asked,
    token-weighted loss over micro-batches, clip at cfg.optim.clip_grad."""
    from megatron.core import parallel_state as ps

    from bitnet_dist.engines import common
    from bitnet_dist.model import build_model, transformer_config

    dev = torch.device("cuda")
    common.ensure_process_group(dev)
    ps.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(cfg.trainer.seed)
    tcfg = transformer_config(cfg.model, cfg.parallel, params_dtype=torch.float32, bf16=False)
    torch.manual_seed(cfg.trainer.seed)
    m = build_model(cfg.model, cfg.precision, tcfg, vocab_size=vocab, seed=cfg.trainer.seed).to(dev)
    groups = common.param_groups(m, cfg.optim.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    n_micro = cfg.trainer.global_batch_size // cfg.trainer.micro_batch_size
    amp = cfg.trainer.dtype == "bf16"
    out = []
    for step in range(steps):
        bs = [common.batch_to_device(data.batch(step, j, cfg.trainer.micro_batch_size, cfg.trainer.seq_length), dev)
              for j in range(n_micro)]
        ntok = sum(b["loss_mask"].sum().item() for b in bs)
        opt.zero_grad(set_to_none=True)
        tot = 0.0
        for b in bs:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                per = m(input_ids=b["tokens"], position_ids=common.position_ids(b["tokens"]), attention_mask=None,
                        labels=b["labels"])
            ls = common.masked_loss_sum(per, b["loss_mask"])
            (ls / ntok).backward()
            tot += ls.item()
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.optim.clip_grad).item()
        common.apply_lr_wd(opt.param_groups, lr_at(step, cfg.optim.lr), cfg.optim.weight_decay)
        opt.step()
        out.append({"step": step, "loss": tot / ntok, "grad_norm": gn})
    ps.destroy_model_parallel()
    return out


def cmd_curve(a):
    models, out = ([a.model] if isinstance(a.model, str) else a.model), a.out
    for model in models:
        one = argparse.Namespace(**{**vars(a), "model": model, "out": out.replace("{model}", model)})
        curve_one(one)
        try:  # next model in the same process: drop this one's process groups
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        except Exception:
            pass
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def curve_one(a):
    cfg = make_cfg(a)
    data = MarkovText(a.vocab, seed=a.seed)
    t0 = time.time()
    if a.engine == "reference":
        rows = reference_curve(cfg, data, a.steps, a.vocab)
    else:
        from bitnet_dist.engines import make_engine

        eng = make_engine(cfg)
        eng.init_parallel()
        eng.build(a.vocab)
        n_micro = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * eng.dp_size)
        rows, start = [], 0
        if a.load:  # continue a run saved at another layout (dist checkpoint resharding)
            start = int(eng.load(Path(a.load))["step"])
        for step in range(start, a.steps):
            # global micro-batch ids dp_rank*n_micro + j: the same global batch at every DP size
            bs = [data.batch(step, eng.dp_rank * n_micro + j, cfg.trainer.micro_batch_size, cfg.trainer.seq_length)
                  for j in range(n_micro)]
            st = eng.train_step(bs, lr_at(step, cfg.optim.lr), cfg.optim.weight_decay)
            rows.append({"step": step, "loss": st.loss, "grad_norm": st.grad_norm, "tokens": st.num_tokens})
            if a.save_at is not None and step + 1 == a.save_at:
                Path(a.save_dir).mkdir(parents=True, exist_ok=True)
                eng.save(Path(a.save_dir), {"step": step + 1})
        valid = [data.batch(0, j, cfg.trainer.micro_batch_size, cfg.trainer.seq_length, "valid") for j in range(2)]
        ev = eng.eval_loss(valid)
        rows.append({"eval_loss": ev[0], "eval_tokens": ev[1]})
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return  # every rank reports the same numbers; rank 0 writes them
    res = {"engine": a.engine, "layout": {"tp": a.tensor, "pp": a.pipeline, "vp": a.virtual, "sp": a.sp},
           "model": a.model, "precision": cfg.precision.name, "dtype": a.dtype,
           "seq": a.seq, "mbs": a.mbs, "gbs": a.gbs, "lr": a.lr, "seed": a.seed, "vocab": a.vocab,
           "kernels": cfg.precision.kernels, "wall_s": time.time() - t0, "rows": rows,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"[curve] {a.engine} {a.model} {cfg.precision.name} {a.dtype}: first {rows[0]['loss']:.5f} "
          f"last {[r for r in rows if 'loss' in r][-1]['loss']:.5f} ({time.time() - t0:.1f}s)", flush=True)


def cmd_compare(a):
    A, B = (json.loads(Path(p).read_text()) for p in a.files)
    da = {r["step"]: r["loss"] for r in A["rows"] if "loss" in r}
    db = {r["step"]: r["loss"] for r in B["rows"] if "loss" in r}
    steps = sorted(set(da) & set(db))  # by step: a resumed run starts later
    la, lb = [da[k] for k in steps], [db[k] for k in steps]
    rel = [abs(x - y) / abs(y) for x, y in zip(la, lb)]
    res = {"a": a.files[0], "b": a.files[1], "first_a": la[0], "first_b": lb[0], "first_abs_diff": abs(la[0] - lb[0]),
           "max_rel_diff": max(rel), "last_a": la[-1], "last_b": lb[-1], "steps": len(rel)}
    print("[compare]", json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


# -- TP invariance on one GPU over gloo (model level) -----------------------------------------------------------
def cmd_tp(a):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from bitnet_dist.engines.common import position_ids
    from bitnet_dist.engines.megatron_engine import MegatronEngine

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {}
    for model in a.models:
        for sp in ([False, True] if world > 1 else [False]):
            ns = argparse.Namespace(**{**vars(a), "model": model, "tensor": world, "engine": "megatron"})
            cfg = make_cfg(ns)
            cfg.parallel.sequence = sp
            key = f"{model}/tp{world}" + ("/sp" if sp else "")
            try:
                eng = MegatronEngine(cfg, model_only=True)
                eng.init_parallel()
                eng.build(a.vocab)
                (m,) = eng.model_chunks()
                data = MarkovText(a.vocab, seed=a.seed)
                b = {k: v.cuda() for k, v in data.batch(0, 0, a.mbs, a.seq).items()}
                per = m(input_ids=b["tokens"], position_ids=position_ids(b["tokens"]), attention_mask=None,
                        labels=b["labels"])
                loss = (per * b["loss_mask"]).sum() / b["loss_mask"].sum()
                loss.backward()
                sq_tp = torch.zeros((), dtype=torch.float64, device="cuda")
                sq_rep = torch.zeros((), dtype=torch.float64, device="cuda")
                for p in m.parameters():
                    if p.grad is not None:
                        s = p.grad.double().pow(2).sum()
                        if getattr(p, "tensor_model_parallel", False):
                            sq_tp += s
                        elif getattr(p, "sequence_parallel", False):
                            # SP norm gains: each rank holds the grad of its sequence slice; sum them
                            g = p.grad.double().clone()
                            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
                            sq_rep += g.pow(2).sum()
                        else:
                            sq_rep += s
                dist.all_reduce(sq_tp, group=ps.get_tensor_model_parallel_group())
                results[key] = {"loss": loss.item(), "grad_norm": math.sqrt((sq_tp + sq_rep).item())}
            except Exception as e:  # record and go on: one failing mode must not hide the others
                results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        print("[tp]", json.dumps(results), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(results) + "\n")
    dist.destroy_process_group()


# -- throughput --------------------------------------------------------------------------------------------------
def flops_per_token(mc, seq: int, vocab: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), megatron's convention: matmul
    parameters x 6, attention scores and values 12 * L * s * h (full square), logits 6 * h * V."""
    try:
        from bitnet_dist.telemetry import flops_per_token as f

        return float(f(mc, seq, vocab))
    except Exception:
        h, L, ffn = mc.hidden_size, mc.num_layers, mc.ffn_hidden_size
        kv = h * (mc.num_query_groups or mc.num_attention_heads) // mc.num_attention_heads
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * ffn
        return 6 * L * per_layer + 12 * L * seq * h + 6 * h * vocab


def probe_costs(eng, steps, profile_dir=None, name_tag="") -> dict:
    """Peak allocated memory and time of one plain step, one step probed the app's way (a forward-only pass
    in telemetry.stats_probe over the first micro-batch, the default trainer.stats_micro_batches=1, or over
    all, then the step) and one step run inside the probe (statistics hooks in the training step: the torch
    path in the hooked layers, eagerly under engine.cuda_graph)."""
    from bitnet_dist.telemetry import Telemetry

    tel = Telemetry.__new__(Telemetry)  # only its statistics probe
    tel.stats_probe_result = None

    def plain():
        eng.train_step(steps[0], 1e-4, 0.1)

    def by_pass(n=None):
        with tel.stats_probe(eng.model_chunks()):
            eng.eval_loss(steps[0][:n])
        eng.train_step(steps[0], 1e-4, 0.1)

    def in_step():
        with tel.stats_probe(eng.model_chunks()):
            eng.train_step(steps[0], 1e-4, 0.1)

    out = {}
    for name, fn in (("plain", plain), ("probe_pass1_first", lambda: by_pass(1)), ("probe_pass1", lambda: by_pass(1)),
                     ("probe_pass", by_pass), ("probe_in_step", in_step), ("after", plain)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            fn()
            torch.cuda.synchronize()
        except torch.OutOfMemoryError as e:
            out[f"{name}_error"] = f"OutOfMemoryError: {str(e)[:160]}"
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            continue
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[f"{name}_above_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        out[f"{name}_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    out["probe_stats_keys"] = len(tel.stats_probe_result or {})
    if profile_dir:  # where the probed step's time goes
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            by_pass(1)
            torch.cuda.synchronize()
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        (Path(profile_dir) / f"probe_{name_tag}.txt").write_text(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=40) + "\n" +
            prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    return out


class _HostSplit:
    """Host-side split of the timed eager steps (megatron engine): time to the return of megatron's forward /
    backward schedule, to the schedule's loss on the host (the GPU has drained), and of the optimizer step.
    megatron-core's finalize_model_grads reads the token count on the host at the end of the schedule (a sync,
    ``--sync-debug``), so the schedule returns only once the GPU has caught up: the first two differ by the
    work queued after that read, not by how far the host ran ahead."""

    def __init__(self, eng):
        self.t = {"queue": [], "drain": [], "optim": []}
        fbf, run, opt_step = eng._forward_backward_func, eng._run_schedule, eng.optimizer.step

        def timed_fbf(forward_only):
            fb = fbf(forward_only)

            def call(*args, **kw):
                out = fb(*args, **kw)
                self.t["queue"].append(time.perf_counter() - self._t0)
                return out
            return call

        def timed_run(*args, **kw):
            self._t0 = time.perf_counter()
            out = run(*args, **kw)
            self.t["drain"].append(time.perf_counter() - self._t0)
            return out

        def timed_step(*args, **kw):
            t0 = time.perf_counter()
            out = opt_step(*args, **kw)
            self.t["optim"].append(time.perf_counter() - t0)
            return out

        eng._forward_backward_func, eng._run_schedule, eng.optimizer.step = timed_fbf, timed_run, timed_step

    def summary(self) -> dict:
        import statistics

        return {f"host_{k}_s": statistics.median(v) for k, v in self.t.items() if v}


def _cuda_trace(eng, steps, trace: Path) -> dict:
    """One training step under torch.profiler with CUDA activity only (no CPU-op recording, so the host runs
    near its unprofiled speed); the GPU's idle time from the trace (tools/megatron/trace_gaps.py)."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trace_gaps import gaps, idle_by_phase

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.train_step(steps[0], 1e-4, 0.1)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    with open(trace) as f:
        ev = json.load(f)["traceEvents"]
    g = {**gaps(ev, top=12, min_us=5.0), "by_phase": idle_by_phase(ev)}
    with open(trace, "rb") as fi, gzip.open(f"{trace}.gz", "wb") as fo:
        shutil.copyfileobj(fi, fo)
    trace.unlink()
    (trace.parent / (trace.name + ".gaps.json")).write_text(json.dumps(g, indent=1))
    return {"cuda_trace_step_s": wall, "cuda_trace_span_ms": g.get("span_ms"), "cuda_trace_busy_ms": g.get("gpu_busy_ms"),
            "cuda_trace_idle_ms": g.get("gpu_idle_ms"), "cuda_trace_n_gaps": g.get("n_gaps"),
            "cuda_trace_idle_by_phase": " ".join(f"{p['phase']}:{p['idle_ms']:.1f}/{p['span_ms']:.1f}"
                                                 for p in g["by_phase"])}


def _sync_points(eng, steps) -> dict:
    """One training step with torch.cuda.set_sync_debug_mode('warn'): where the host waits for the GPU (the
    innermost Python frames of each synchronizing call, with counts)."""
    import collections
    import traceback
    import warnings

    seen: collections.Counter = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            seen[" <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                             for f in reversed(frames[-4:]))] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            eng.train_step(steps[0], 1e-4, 0.1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {"sync_points": dict(seen.most_common(20))}


def cmd_bench(a):
    from bitnet_dist.engines import make_engine
    from bitnet_dist.kernels import ternary

    rows = []
    for idx, label in enumerate(a.precision):
        # PREC@nobatch: the engine built without the per-step weight batch (BITNET_BATCHED_WEIGHT_QUANT=0), for
        # an A / B in one process
        prec, _, variant = label.partition("@")
        tag = f"{prec}_{variant}_{idx}" if variant else (prec if a.precision.count(label) == 1 else f"{prec}_{idx}")
        if variant not in ("", "nobatch"):
            raise SystemExit(f"--precision {label}: the only variant is @nobatch")
        ns = argparse.Namespace(**{**vars(a), "precision": prec, "engine": "megatron"})
        cfg = make_cfg(ns)
        data = MarkovText(a.vocab, seed=a.seed)
        batched = ternary.BATCHED_WEIGHT_QUANT
        try:
            ternary.BATCHED_WEIGHT_QUANT = batched and variant != "nobatch"
            eng = make_engine(cfg)
            eng.init_parallel()
            eng.build(a.vocab)
            ternary.BATCHED_WEIGHT_QUANT = batched
            n_micro = cfg.trainer.global_batch_size // cfg.trainer.micro_batch_size
            steps = [[data.batch(s, j, a.mbs, a.seq) for j in range(n_micro)] for s in range(2)]
            torch.cuda.reset_peak_memory_stats()
            for i in range(a.warmup):
                eng.train_step(steps[i % 2], 1e-4, 0.1)
            torch.cuda.synchronize()
            split = _HostSplit(eng) if a.host_split else None
            if a.gc_off:  # Python's cyclic GC off over the timed steps (after a full collection)
                import gc

                gc.collect()
                gc.disable()
            t0 = time.perf_counter()
            try:
                for i in range(a.iters):
                    st = eng.train_step(steps[i % 2], 1e-4, 0.1)
                torch.cuda.synchronize()
            finally:
                if a.gc_off:
                    gc.enable()
            dt = (time.perf_counter() - t0) / a.iters
            peak = torch.cuda.max_memory_allocated()
            split = split.summary() if split else {}
            if a.sync_debug:
                split.update(_sync_points(eng, steps))
            if a.profile_cuda:  # one more step traced with CUDA activity only: GPU idle with little host cost
                split.update(_cuda_trace(eng, steps, Path(a.profile_cuda) / f"{a.model}_{tag}_cuda.trace.json"))
            probe = (probe_costs(eng, steps, a.profile, f"{a.model}_{tag}_mbs{a.mbs}") if a.probe_check else {})
            if a.profile:  # one more step under the profiler: where the step's GPU time goes
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    eng.train_step(steps[0], 1e-4, 0.1)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
                Path(a.profile).mkdir(parents=True, exist_ok=True)
                (Path(a.profile) / f"{a.model}_{tag}.txt").write_text(table)
                trace = Path(a.profile) / f"{a.model}_{tag}.trace.json"  # GPU idle gaps: tools/megatron/trace_gaps.py
                prof.export_chrome_trace(str(trace))
                import gzip
                import shutil

                with open(trace, "rb") as fi, gzip.open(f"{trace}.gz", "wb") as fo:
                    shutil.copyfileobj(fi, fo)
                trace.unlink()
            tok = a.gbs * a.seq
            fpt = flops_per_token(cfg.model, a.seq, a.vocab)
            row = {"model": a.model, "precision": prec, **({"variant": variant} if variant else {}),
                   "batched_weights": getattr(eng, "batched_weights", 0), "kernels": cfg.precision.kernels, "seq": a.seq, "mbs": a.mbs,
                   "gbs": a.gbs, "step_s": dt, "tokens_per_s": tok / dt, "tflops": fpt * tok / dt / 1e12,
                   "mfu": fpt * tok / dt / H100_BF16_DENSE, "peak_mem_gib": peak / 2**30,
                   "loss": st.loss, "fp8_backward": bool(cfg.precision.fp8_backward),
                   "fused_swiglu": bool(cfg.precision.fused_swiglu),
                   "cuda_graph": bool(cfg.engine.cuda_graph), "graph_replays": getattr(eng, "graph_replays", 0),
                   **({"gc_off": True} if a.gc_off else {}), **probe, **split}
        except Exception as e:
            row = {"model": a.model, "precision": prec, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        finally:
            ternary.BATCHED_WEIGHT_QUANT = batched
        print("[bench]", json.dumps(row), flush=True)
        rows.append(row)
        # free this engine before the next precision
        try:
            from megatron.core import parallel_state as ps

            eng.drop_cuda_graph()  # the captured step's memory pool (megatron keeps the graph on its class)
            del eng
            ps.destroy_model_parallel()
        except Exception:
            pass
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(0), "date": _dt.datetime.utcnow().strftime("%Y-%m-%d"),
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common_args(q, model="tiny", seq=128, mbs=4, gbs=8, dtype="bf16"):
        q.add_argument("--model", default=model)
        q.add_argument("--layers", type=int, default=None)
        q.add_argument("--kernels", default=None)
        q.add_argument("--fp8-backward", dest="fp8_backward", action="store_true")
        q.add_argument("--cuda-graph", dest="cuda_graph", action="store_true",
                       help="engine.cuda_graph=true (megatron: the training step as one CUDA graph)")
        q.add_argument("--seq", type=int, default=seq)
        q.add_argument("--mbs", type=int, default=mbs)
        q.add_argument("--gbs", type=int, default=gbs)
        q.add_argument("--dtype", default=dtype)
        q.add_argument("--seed", type=int, default=1234)
        q.add_argument("--lr", type=float, default=1e-3)
        q.add_argument("--vocab", type=int, default=1024)
        q.add_argument("--out", required=True)

    q = sub.add_parser("curve")
    common_args(q)
    q.set_defaults(model=["tiny"])
    q.add_argument("--models", dest="model", nargs="+")
    q.add_argument("--engine", default="megatron", choices=["megatron", "deepspeed", "reference"])
    q.add_argument("--precision", default="v2_a8")
    q.add_argument("--steps", type=int, default=50)
    # several GPUs (torchrun --nproc_per_node N): layout, and checkpoint save / continue at another layout
    q.add_argument("--tp", dest="tensor", type=int, default=1)
    q.add_argument("--pp", dest="pipeline", type=int, default=1)
    q.add_argument("--vp", dest="virtual", type=int, default=None)
    q.add_argument("--sp", action="store_true")
    q.add_argument("--save-at", type=int, default=None)
    q.add_argument("--save-dir", default="/tmp/megatron_ckpt")
    q.add_argument("--load", default=None)
    q = sub.add_parser("compare")
    q.add_argument("files", nargs=2)
    q.add_argument("--out", default=None)
    q = sub.add_parser("tp")
    common_args(q, dtype="fp32", mbs=2)
    q.add_argument("--models", nargs="+", default=["small"])
    q.add_argument("--precision", default="v2_a8")
    q = sub.add_parser("bench")
    common_args(q, model="400M", seq=2048, mbs=4, gbs=16)
    q.add_argument("--precision", nargs="+", default=["bf16", "v2_a8", "v2_a4"])
    q.add_argument("--warmup", type=int, default=3)
    q.add_argument("--iters", type=int, default=8)
    q.add_argument("--profile", default=None, help="folder for a torch.profiler table of one extra step")
    q.add_argument("--profile-cuda", dest="profile_cuda", default=None,
                   help="folder for a CUDA-only torch.profiler trace of one extra step, with its GPU idle time")
    q.add_argument("--gc-off", dest="gc_off", action="store_true",
                   help="Python's cyclic garbage collector off over the timed steps")
    q.add_argument("--sync-debug", dest="sync_debug", action="store_true",
                   help="one more step with torch.cuda.set_sync_debug_mode('warn'): the host's waits, by caller")
    q.add_argument("--host-split", dest="host_split", action="store_true",
                   help="time the host's queueing of each timed step's schedule against its drain (megatron engine)")
    q.add_argument("--probe-check", dest="probe_check", action="store_true",
                   help="after the timed steps: memory and time of a plain, a probed (forward pass) and an "
                        "in-step-probed training step")
    a = p.parse_args(argv)
    {"curve": cmd_curve, "compare": cmd_compare, "tp": cmd_tp, "bench": cmd_bench}[a.cmd](a)


if __name__ == "__main__":
    main()
