"""End-to-end training benchmark: ``python -m bitnet_dist.bench_e2e --out DIR`` (or ``bitnet-bench-e2e``).

For each model preset it runs, one after another on the same GPU and each in a process of its own:

* the train app itself, ``python -m bitnet_dist.train`` with the overrides a user would type (``engine=megatron
  data=synthetic model=M precision=P`` plus the batch shape), for ``bf16``, ``v2_a8``, ``v2_a4`` (the exact path:
  bf16 backward GEMMs) and ``v2_a4_fp8bwd`` (``precision.fp8_backward=true``). Its numbers come from the run's
  own ``metrics.jsonl`` (one record per step: ``trainer.log_interval=1``) and start record (the kernel path).
  The runs write no checkpoint (``trainer.checkpoints=false``) and evaluate one micro-batch at the end;
* the two peers of ``bitnet_dist.bench_peers``: ``plain`` (PyTorch LLaMA of the same shapes, bf16 autocast, fused
  AdamW, torch.compile, SDPA flash attention) and ``torchao`` (the same with torchao's BitNet b1.58 training
  linears and an RMSNorm before each of them).

``--variants NAME=OVERRIDES`` adds train-app rows: each configuration of ``--variant-configs`` again with more
overrides, named ``CONFIG+NAME`` and compared with the ``CONFIG`` row of the same run (a same-GPU A/B, e.g.
``graph=engine.cuda_graph=true``).

Every row trains the same number of tokens per step (micro x global batch x seq) on uniform random tokens.
Reported per row: tokens/s (median over the steps after ``--warmup``), MFU (the project's FLOP count,
``telemetry.flops_per_token``, the same for every row, over the device's dense bf16 peak), peak memory (the CUDA
allocator's maximum, GiB), and the ratios against the throughput targets (a table in the report). Results: DIR/e2e_<device>_<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

# the CLI configurations: name -> precision overrides (the exact path is the presets' default)
CONFIGS = {
    "bf16": ["precision=bf16"],
    "v2_a8": ["precision=v2_a8"],
    "v2_a4": ["precision=v2_a4"],
    "v2_a4_fp8bwd": ["precision=v2_a4", "precision.fp8_backward=true"],
}
# (row, peer it is compared with, target ratio of tokens/s); peak memory is compared with the plain peer
TARGETS = (("bf16", "plain", 1.0), ("v2_a8", "torchao", 1.1), ("v2_a4", "plain", 1.05),
           ("v2_a4_fp8bwd", "plain", 1.25))


def train_overrides(model: str, config: str, *, seq: int, mbs: int, gbs: int, vocab: int, steps: int,
                    run_dir: Path, engine: str = "megatron", extra: Sequence[str] = ()) -> list[str]:
    """The ``python -m bitnet_dist.train`` overrides of one benchmark row."""
    if config not in CONFIGS:
        raise ValueError(f"config {config!r}: one of {list(CONFIGS)}")
    return ["experiment=smoke", f"model={model}", *CONFIGS[config], "data=synthetic", f"data.vocab_size={vocab}",
            f"engine={engine}", "optim=constant", "optim.warmup_steps=0",
            f"trainer.seq_length={seq}", f"trainer.micro_batch_size={mbs}", f"trainer.global_batch_size={gbs}",
            f"trainer.max_steps={steps}", "trainer.log_interval=1", f"trainer.eval_interval={steps}",
            "trainer.eval_batches=1", "trainer.stats_interval=0", "trainer.progress_bar=false",
            "trainer.report=false", "trainer.checkpoints=false", "logging.wandb=disabled", f"run_dir={run_dir}",
            *extra]


def summarize_metrics(records: list[dict], warmup: int) -> dict:
    """A run's metrics.jsonl -> tokens/s (median over the step records after ``warmup``), peak memory (GiB), the
    kernel path of its start record, steps and the last loss. Raises ValueError when no step was timed."""
    steps = [r for r in records if "event" not in r and "tokens_per_s" in r and r.get("tokens_per_s")]
    timed = [r for r in steps if r["step"] > warmup]
    if not timed:
        raise ValueError(f"no step records after the {warmup} warm-up steps ({len(steps)} step records)")
    start = next((r for r in records if r.get("event") == "start"), {})
    mem = [r[k] for r in steps for k in ("mem/max_allocated_gib",) if r.get(k) is not None]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "tokens_per_s_steps": [r["tokens_per_s"] for r in steps],
            "peak_mem_gib": max(mem) if mem else None, "timed_steps": len(timed),
            "loss": steps[-1].get("loss"), "kernels": start.get("kernels"),
            "kernels_reason": start.get("kernels_reason"), "fused": start.get("fused")}


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``NAME=OVERRIDE[,OVERRIDE...]`` (``--variants``) -> (name, overrides)."""
    name, sep, rest = spec.partition("=")
    overrides = [o for o in rest.split(",") if o]
    if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name) or not overrides or any("=" not in o for o in overrides):
        raise ValueError(f"--variants {spec!r}: expected NAME=KEY=VALUE[,KEY=VALUE...], e.g. "
                         "graph=engine.cuda_graph=true (NAME: letters, digits, _)")
    return name, overrides


def run_cli(model: str, config: str, args, workdir: Path, variant: Optional[tuple[str, list[str]]] = None) -> dict:
    """One row through the train app in a subprocess; ``variant`` (name, overrides) adds overrides to the config's
    and names the row ``config+name``."""
    name = config if variant is None else f"{config}+{variant[0]}"
    run_dir = workdir / f"{model}_{name}".replace("+", "_")
    steps = args.steps + (1 if args.profile else 0)  # the profiled step is one more, after the timed ones
    extra = [*args.train_args, *(variant[1] if variant else []),
             *([f"trainer.profile_step={steps}"] if args.profile else [])]
    cmd = [sys.executable, "-m", "bitnet_dist.train",
           *train_overrides(model, config, seq=args.seq, mbs=args.mbs, gbs=args.gbs, vocab=args.vocab,
                            steps=steps, run_dir=run_dir, engine=args.engine, extra=extra)]
    row = {"kind": "cli", "model": model, "config": name, "command": "python -m bitnet_dist.train " +
           " ".join(a for a in cmd[3:] if not a.startswith("run_dir="))}
    if variant is not None:
        row.update(base=config, variant=variant[0], variant_overrides=variant[1])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=workdir,
                           env=dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout} s"}
    row["wall_s"] = time.perf_counter() - t0
    if p.returncode != 0:
        return {**row, "error": _error_line(p.stderr) or f"exit {p.returncode}", "stderr_tail": p.stderr[-2000:]}
    from bitnet_dist.report import read_metrics

    try:
        row.update(summarize_metrics(read_metrics(run_dir / "metrics.jsonl"), args.warmup))
    except ValueError as e:
        row["error"] = str(e)
    prof = run_dir / f"profile_step_{steps}.json"
    if args.profile and prof.is_file():
        row["profile"] = json.loads(prof.read_text())
    return row


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^(\w+\.)*\w*(Error|Exception)\b|^bitnet-train:", ln)]
    return (errs[-1] if errs else (lines[-1] if lines else ""))[:300]


def run_peer(model: str, peer: str, args, workdir: Path) -> dict:
    """One peer row in a subprocess of this module (``--peer``)."""
    out = workdir / f"{model}_peer_{peer}.json"
    cmd = [sys.executable, "-m", "bitnet_dist.bench_e2e", "--peer", peer, "--models", model, "--seq", str(args.seq),
           "--mbs", str(args.mbs), "--gbs", str(args.gbs), "--vocab", str(args.vocab), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--peer-json", str(out)]
    if args.peer_device:
        cmd += ["--peer-device", args.peer_device]
    if args.no_compile:
        cmd += ["--no-compile"]
    if args.profile:
        cmd += ["--profile"]
    row = {"kind": "peer", "model": model, "config": peer}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=workdir)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout} s"}
    row["wall_s"] = time.perf_counter() - t0
    if p.returncode != 0 or not out.is_file():
        return {**row, "error": _error_line(p.stderr) or f"exit {p.returncode}", "stderr_tail": p.stderr[-2000:]}
    res = json.loads(out.read_text())
    if "skipped" in res:
        return {**row, "skipped": res["skipped"]}
    row.update({k: res[k] for k in ("tokens_per_s", "peak_mem_gib", "loss", "step_s")})
    if res.get("profile"):
        row["profile"] = res["profile"]
    row["timed_steps"] = len(res["step_s"]) - args.warmup
    return row


def peer_shape(model: str, vocab: int, seq: int, tensor: int = 1):
    from bitnet_dist.bench_peers import PeerShape
    from bitnet_dist.presets import model_preset, padded_vocab_size

    return PeerShape.from_model(model_preset(model), padded_vocab_size(vocab, tensor), seq)


def peer_main(args) -> int:
    """Worker: train one peer, write its JSON (or why it was skipped)."""
    from bitnet_dist.bench_peers import peer_available, train_peer

    device = args.peer_device or "cuda"
    reason = peer_available(args.peer, device)
    if reason:
        Path(args.peer_json).write_text(json.dumps({"skipped": reason}))
        return 0
    prof = Path(args.peer_json).with_suffix(".profile.json") if args.profile else None
    res = train_peer(args.peer, peer_shape(args.models[0], args.vocab, args.seq), micro_batch=args.mbs,
                     global_batch=args.gbs, steps=args.steps, warmup=args.warmup, device=device,
                     compile=not args.no_compile, profile=str(prof) if prof else None)
    if prof is not None and prof.is_file():
        res["profile"] = json.loads(prof.read_text())
    Path(args.peer_json).write_text(json.dumps(res))
    return 0


def add_derived(rows: list[dict], *, seq: int, vocab: int, peak_flops: Optional[float]) -> None:
    """MFU per row (one FLOP count for every row of a model) and each model's ratios against its peers."""
    from bitnet_dist.presets import model_preset, padded_vocab_size
    from bitnet_dist.telemetry import flops_per_token

    for r in rows:
        if r.get("tokens_per_s"):
            r["flops_per_token"] = flops_per_token(model_preset(r["model"]), seq, padded_vocab_size(vocab))
            r["tflops"] = r["tokens_per_s"] * r["flops_per_token"] / 1e12
            r["mfu"] = r["tflops"] * 1e12 / peak_flops if peak_flops else None
    for r in rows:
        if r["kind"] != "cli" or not r.get("tokens_per_s"):
            continue
        peers = {p["config"]: p for p in rows if p["kind"] == "peer" and p["model"] == r["model"]
                 and p.get("tokens_per_s")}
        r["vs"] = {name: r["tokens_per_s"] / p["tokens_per_s"] for name, p in peers.items()}
        if "plain" in peers and r.get("peak_mem_gib") and peers["plain"].get("peak_mem_gib"):
            r["mem_vs_plain"] = r["peak_mem_gib"] / peers["plain"]["peak_mem_gib"]
        base = next((b for b in rows if r.get("base") and b["kind"] == "cli" and b["model"] == r["model"]
                     and b["config"] == r["base"] and b.get("tokens_per_s")), None)
        if base is not None:
            r["vs_base"] = r["tokens_per_s"] / base["tokens_per_s"]


def target_table(rows: list[dict]) -> list[dict]:
    """Per model and target: the measured ratio and whether it meets the target (None where a row is missing)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["config"]: r for r in rows if r["model"] == model}
        for cfg, peer, target in TARGETS:
            ratio = by.get(cfg, {}).get("vs", {}).get(peer)
            mem = by.get(cfg, {}).get("mem_vs_plain")
            out.append({"model": model, "row": cfg, "peer": peer, "target": target, "ratio": ratio,
                        "met": None if ratio is None else ratio >= target,
                        "mem_vs_plain": mem, "mem_met": None if mem is None else mem <= 1.0})
    return out


def _path(r: dict) -> str:
    """The kernel path column: the layers' path, and the fused paths outside them (bitnet_dist.fusions)."""
    if r["kind"] == "peer":
        return "-"
    fused = r.get("fused")
    return (r.get("kernels") or "?") + ("" if fused is None else f" + {', '.join(fused) or 'no fusions'}")


def _f(v, spec, suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def to_markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# End-to-end training throughput against the peers ({m['device']}, {m['date']})", "",
             f"Command: `{m['command']}`", "",
             f"One GPU ({m['device']}), torch {m['torch']}; {m['seq']} tokens x micro-batch {m['mbs']} x global batch "
             f"{m['gbs']} sequences per optimizer step ({m['gbs'] * m['seq']:,} tokens), vocabulary {m['vocab']}, "
             f"uniform random tokens; {m['steps']} steps per row, tokens/s the median of the steps after "
             f"{m['warmup']} warm-up steps. `cli` rows: the train app (`python -m bitnet_dist.train`, engine "
             f"{m['engine']}), numbers from its metrics.jsonl; `peer` rows: bitnet_dist.bench_peers. MFU: the "
             "project's FLOP count (6 x matmul weights + 12 L h s attention, the same for every row) over the "
             f"device's dense bf16 peak ({_f(m.get('peak_tflops'), '.0f')} TFLOP/s).", "",
             "| model | row | kind | kernel path + fused paths | tokens/s | MFU | peak mem (GiB) | vs plain | vs torchao |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r.get("error") or r.get("skipped"):
            lines.append(f"| {r['model']} | {r['config']} | {r['kind']} | | "
                         f"{'failed: ' + r['error'] if r.get('error') else 'skipped: ' + r['skipped']} | | | | |")
            continue
        vs = r.get("vs", {})
        lines.append(f"| {r['model']} | {r['config']} | {r['kind']} | {_path(r)} "
                     f"| {r['tokens_per_s']:,.0f} | {_f(r.get('mfu') and 100 * r['mfu'], '.1f', '%')} "
                     f"| {_f(r.get('peak_mem_gib'), '.1f')} | {_f(vs.get('plain'), '.2f', 'x')} | {_f(vs.get('torchao'), '.2f', 'x')} |")
    lines += ["", "Targets (tokens/s ratio in this run; peak memory at most the plain peer's):", "",
              "| model | row | against | target | measured | met | peak mem vs plain | met |",
              "|---|---|---|---|---|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['model']} | {t['row']} | {t['peer']} | {t['target']:.2f}x | {_f(t['ratio'], '.3f', 'x')} | "
                     f"{'-' if t['met'] is None else ('yes' if t['met'] else 'no')} | {_f(t['mem_vs_plain'], '.2f')} | "
                     f"{'-' if t['mem_met'] is None else ('yes' if t['mem_met'] else 'no')} |")
    lines += variant_markdown(res["rows"])
    lines += profile_markdown(res["rows"])
    return "\n".join(lines) + "\n"


def variant_markdown(rows: list[dict]) -> list[str]:
    """The ``--variants`` rows against the row of their base configuration, in the same run."""
    var = [r for r in rows if r.get("variant")]
    if not var:
        return []
    out = ["", "Variants against their base row (same run, same GPU):", "",
           "| model | row | overrides | tokens/s | vs base row | peak mem (GiB) |", "|---|---|---|---|---|---|"]
    for r in var:
        ovr = " ".join(f"`{o}`" for o in r["variant_overrides"])
        if r.get("error"):
            out.append(f"| {r['model']} | {r['config']} | {ovr} | failed: {r['error']} | | |")
            continue
        out.append(f"| {r['model']} | {r['config']} | {ovr} | {r['tokens_per_s']:,.0f} | "
                   f"{_f(r.get('vs_base'), '.3f', 'x')} | {_f(r.get('peak_mem_gib'), '.1f')} |")
    return out


def profile_markdown(rows: list[dict]) -> list[str]:
    """Where each row's profiled step goes: kernel ms by category, idle (host) time and the wall time."""
    prof = [r for r in rows if r.get("profile")]
    if not prof:
        return []
    cats = list(dict.fromkeys(c for r in prof for c in r["profile"]["by_category_ms"]))
    out = ["", "Where one profiled step goes (ms; device kernels summed by category from their names, "
               "bitnet_dist.profile; idle = wall - kernels):", "",
           "| model | row | wall | idle | " + " | ".join(cats) + " |", "|---|---|---|---|" + "---|" * len(cats)]
    for r in prof:
        p = r["profile"]
        out.append(f"| {r['model']} | {r['config']} | {p['wall_ms']:.1f} | {p['idle_ms']:.1f} | "
                   + " | ".join(_f(p["by_category_ms"].get(c), ".1f") for c in cats) + " |")
    return out


def device_info(device: Optional[str] = None) -> tuple[str, Optional[float]]:
    """(device name, dense bf16 peak FLOP/s or None)."""
    import torch

    from bitnet_dist.telemetry import device_peak_flops

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu", None
    return torch.cuda.get_device_name(0), device_peak_flops(torch.device("cuda", 0), torch.bfloat16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bitnet-bench-e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["1.3B", "400M"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--peers", nargs="*", default=["plain", "torchao"], choices=["plain", "torchao"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--gbs", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the median (compilation, autotuning)")
    p.add_argument("--engine", default="megatron")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per row")
    p.add_argument("--train-args", nargs="*", default=[], help="more overrides for every train-app row")
    p.add_argument("--variants", nargs="*", default=[], metavar="NAME=OVERRIDES",
                   help="more train-app rows, each config of --variant-configs again with these overrides (comma "
                        "separated), named CONFIG+NAME and compared with the CONFIG row of the same run, e.g. "
                        "graph=engine.cuda_graph=true nofuse=trainer.fused_rope=false,optim.fused=false")
    p.add_argument("--variant-configs", nargs="+", choices=list(CONFIGS),
                   help="the configs the variants apply to (default: --configs)")
    p.add_argument("--out", type=Path, default=Path("bench_e2e_out"))
    p.add_argument("--no-compile", action="store_true", help="peers without torch.compile (tests on CPU)")
    p.add_argument("--profile", action="store_true",
                   help="one more step per row under torch.profiler: its kernel time by category (bitnet_dist.profile)")
    p.add_argument("--peer", help=argparse.SUPPRESS)  # worker mode: train one peer
    p.add_argument("--peer-json", help=argparse.SUPPRESS)
    p.add_argument("--peer-device", help=argparse.SUPPRESS)  # tests: cpu
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peer:
        return peer_main(args)
    if args.warmup >= args.steps:
        print(f"bitnet-bench-e2e: --warmup {args.warmup} leaves no timed step of --steps {args.steps}", file=sys.stderr)
        return 2
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        print(f"bitnet-bench-e2e: {e}", file=sys.stderr)
        return 2
    if len({n for n, _ in variants}) < len(variants):
        print(f"bitnet-bench-e2e: --variants names repeat: {[n for n, _ in variants]}", file=sys.stderr)
        return 2
    variant_configs = args.variant_configs or args.configs
    import torch

    device, peak = device_info(args.peer_device)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {"device": device, "date": date, "torch": torch.__version__, "seq": args.seq, "mbs": args.mbs,
            "gbs": args.gbs, "vocab": args.vocab, "steps": args.steps, "warmup": args.warmup, "engine": args.engine,
            "peak_tflops": peak / 1e12 if peak else None,
            "command": "python -m bitnet_dist.bench_e2e " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    stem = args.out / f"e2e_{tag}_{date}"
    rows: list[dict] = []

    def write():
        res = {"meta": meta, "rows": rows}
        add_derived(rows, seq=args.seq, vocab=args.vocab, peak_flops=peak)
        res["targets"] = target_table(rows)
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
        stem.with_suffix(".md").write_text(to_markdown(res))
        return res

    with tempfile.TemporaryDirectory(prefix="bench_e2e_", dir=args.out) as tmp:
        for model in args.models:
            for peer in args.peers:
                rows.append(run_peer(model, peer, args, Path(tmp)))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_s"}), flush=True)
                write()
            todo = [(c, None) for c in args.configs] + [(c, v) for v in variants for c in variant_configs]
            for config, variant in todo:
                rows.append(run_cli(model, config, args, Path(tmp), variant))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens_per_s_steps"}), flush=True)
                write()
    res = write()
    print(to_markdown(res))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    failed = [f"{r['model']} {r['config']}" for r in rows if r.get("error")]
    if failed:
        print(f"bitnet-bench-e2e: {len(failed)} row(s) failed: {', '.join(failed)} (errors in the JSON)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
