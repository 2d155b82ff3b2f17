"""The reproduction study's evidence: collect the runs' metrics files and render docs/results.md.

    python -m bitnet_dist.results collect runs/repro runs/repro_blocks   # copy metrics into docs/results/data
    python -m bitnet_dist.results render                                 # tables + PNGs + docs/results.md

Everything in docs/results.md that is a number or a plot is computed here from the files committed under
docs/results/data/: the runs' metrics (<experiment>/<run>.jsonl + .config.json), the standalone throughput
benchmark (bench25m.jsonl, written by tools/megatron/gpu_check.py bench) and the final numbers of the earlier
attempt (earlier_attempt.json, for the reproducibility check); nothing is typed in. The hand-written
discussion is kept between the DISCUSSION markers of docs/results.md and preserved when the page is rendered
again. Run it from the repository root: the docs/ paths are relative to the working directory (the package
may be installed anywhere).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from bitnet_dist.config import conf_file

ROOT = Path.cwd()  # the repository checkout whose docs/ this renders
DATA = ROOT / "docs" / "results" / "data"
DOC = ROOT / "docs" / "results.md"
FIG = ROOT / "docs" / "results"
BENCH = "bench25m.jsonl"  # under DATA
EARLIER = "earlier_attempt.json"  # under DATA
VARIANTS = ["bf16", "b158", "v2_a8", "v2_a8_to_a4", "v2_a4", "v2_a4_no_hadamard"]
BEGIN, END = "<!-- DISCUSSION BEGIN -->", "<!-- DISCUSSION END -->"


# ---------------------------------------------------------------------------------------------- collect
def _run_config(metrics: Path) -> dict:
    """The resolved config of the run that wrote ``metrics`` (train.py saves it next to the metrics)."""
    run_dir = metrics.parent
    for cand in [run_dir / "config.yaml", *sorted(run_dir.glob("hydra/*/.hydra/config.yaml"))]:
        if cand.exists():
            return yaml.safe_load(cand.read_text())
    raise FileNotFoundError(f"no config.yaml for {metrics}: expected {run_dir}/config.yaml or hydra/*/.hydra/config.yaml")


def run_key(cfg: dict) -> tuple[str, str]:
    exp = cfg.get("experiment", "default")
    name = f"{cfg['precision']['name']}_hb{cfg['model']['hadamard_block']}_s{cfg['trainer']['seed']}"
    return exp, name


def collect(roots: list[str]) -> list[Path]:
    out = []
    for root in roots:
        for metrics in sorted(Path(root).rglob("metrics.jsonl")):
            cfg = _run_config(metrics)
            exp, name = run_key(cfg)
            dst = DATA / exp / f"{name}.jsonl"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(metrics, dst)
            meta = {k: cfg[k] for k in ("model", "precision", "trainer", "optim", "data") if k in cfg}
            dst.with_suffix(".config.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            out.append(dst)
    return out


# ----------------------------------------------------------------------------------------------- render
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_runs(exp: str) -> list[dict]:
    runs = []
    for f in sorted((DATA / exp).glob("*.jsonl")):
        recs = read_jsonl(f)
        cfg = json.loads(f.with_suffix(".config.json").read_text())
        finished = any(r.get("event") == "finished" for r in recs)
        # Trained to the end with its final evaluation, but stopped after it (e.g. at the last checkpoint):
        # the numbers are complete and comparable; the status column says so.
        trained = any(r.get("step") == cfg["trainer"]["max_steps"] and "val_ppl" in r for r in recs)
        if not (finished or trained):
            continue  # a run cut off before its end is not comparable; it stays in the data folder
        runs.append({"name": f.stem, "cfg": cfg, "recs": recs, "file": f.relative_to(ROOT),
                     "status": "finished" if finished else "trained; stopped after the final eval"})
    return runs


def series(recs: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in recs if key in r and "event" not in r and r[key] is not None]


def last(recs: list[dict], key: str):
    s = series(recs, key)
    return s[-1][1] if s else None


def final_val_ppl(recs: list[dict]):
    """Validation perplexity of the last evaluation (after the switch, for switching runs)."""
    s = [(r["step"], r["val_ppl"]) for r in recs if "val_ppl" in r]
    return s[-1][1] if s else None


def switch_step(recs: list[dict]):
    for r in recs:
        if r.get("event") == "act_bits_switch":
            return r["step"]
    return None


def seed(run: dict) -> int:
    return run["cfg"]["trainer"]["seed"]


def _mean_spread(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0


def _fmt(m, s, digits=2):
    return "n/a" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _per_seed(runs: list[dict]) -> str:
    return ", ".join(f"{final_val_ppl(r['recs']):.2f}" for r in sorted(runs, key=seed))


def _last_stats(run: dict, kind: str) -> dict | None:
    """The last telemetry record of ``kind`` (wo, wdown, ...) with its keys stripped of the prefix."""
    p = f"stats/{kind}/"
    rec = next((x for x in reversed(run["recs"]) if p + "kurtosis_pre" in x), None)
    if rec is None:
        return None
    return {"step": rec["step"], **{k[len(p):]: v for k, v in rec.items() if k.startswith(p)}}


def _stat_mean(runs: list[dict], kind: str, key: str):
    vals = [s[key] for s in (_last_stats(r, kind) for r in runs) if s and s.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _f(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def _plot_curves(groups: dict, path: Path, title: str, zoom: bool = False) -> None:
    """Training loss and validation perplexity against tokens, one colour per group and one line style per seed.

    zoom: a third panel with the validation perplexity around the 8->4 switch (the evaluations just before
    and just after it, logged by switching runs as val_ppl_before_switch / val_ppl_after_switch)."""
    import matplotlib  # deferred: matplotlib is needed only for the figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if zoom else 2, figsize=(19 if zoom else 13, 4.8))
    a1, a2 = axes[0], axes[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", ":", "-.", (0, (5, 1))]
    switches = []
    for g, (name, runs) in enumerate(groups.items()):
        color = colors[g % len(colors)]
        for i, run in enumerate(sorted(runs, key=seed)):
            tok_per_step = run["cfg"]["trainer"]["global_batch_size"] * run["cfg"]["trainer"]["seq_length"]
            lo = series(run["recs"], "loss")
            vp = series(run["recs"], "val_ppl")
            kw = dict(color=color, ls=styles[i % len(styles)], alpha=0.85, lw=1.2)
            a1.plot([s * tok_per_step / 1e6 for s, _ in lo], [v for _, v in lo], label=f"{name} (seed {seed(run)})", **kw)
            a2.plot([s * tok_per_step / 1e6 for s, _ in vp], [v for _, v in vp], marker=".", **kw)
            sw = switch_step(run["recs"])
            if sw is not None:
                switches.append(sw * tok_per_step / 1e6)
            if zoom and name in ("v2_a8", "v2_a8_to_a4"):
                pts = [(s, v) for s, v in vp if sw is None or s != sw]
                if sw is not None:
                    before = last(run["recs"], "val_ppl_before_switch")
                    after = last(run["recs"], "val_ppl_after_switch")
                    pts += [(sw - 0.3, before), (sw + 0.3, after)] if before and after else []
                pts = sorted((s, v) for s, v in pts if s >= 0.75 * run["cfg"]["trainer"]["max_steps"])
                axes[2].plot([s * tok_per_step / 1e6 for s, _ in pts], [v for _, v in pts], marker="o",
                             label=f"{name} (seed {seed(run)})", **kw)
    for x in sorted(set(switches)):
        for ax in axes:
            ax.axvline(x, color="black", ls="--", lw=0.8, alpha=0.6)
    sw_note = " (dashed: 8->4 switch)" if switches else ""
    a1.set(xlabel="tokens (M)", ylabel="train loss", title=f"{title}: training loss{sw_note}")
    a2.set(xlabel="tokens (M)", ylabel="validation perplexity", yscale="log", title="validation perplexity")
    a1.legend(fontsize=7, ncol=2)
    if zoom:
        axes[2].set(xlabel="tokens (M)", ylabel="validation perplexity",
                    title="8->4 transition: v2_a8 vs v2_a8_to_a4 (evaluated just before and after the switch)")
        axes[2].title.set_fontsize(9)
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_hist(runs: list[dict], path: Path) -> str | None:
    """Histograms of the Wo / Wdown inputs before and after the Hadamard transform (last stats record of the
    first run that logged them), with the standard normal as reference. Returns the run's name."""
    import matplotlib  # deferred: matplotlib is needed only for the figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = next((r for r in runs if all((_last_stats(r, k) or {}).get("hist_pre") for k in ("wo", "wdown"))), None)
    if run is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, kind in zip(axes, ("wo", "wdown")):
        st = _last_stats(run, kind)
        pre, post, edges = st["hist_pre"], st.get("hist_post"), st.get("hist_edges") or list(range(len(st["hist_pre"]) + 1))
        ax.stairs(pre, edges, label=f"before Hadamard (kurtosis {st['kurtosis_pre']:.1f})", lw=1.4)
        if post:
            ax.stairs(post, edges, label=f"after Hadamard (kurtosis {st['kurtosis_post']:.1f})", lw=1.4)
        gauss = [0.5 * (math.erf(b / math.sqrt(2)) - math.erf(a / math.sqrt(2))) for a, b in zip(edges[:-1], edges[1:])]
        ax.stairs(gauss, edges, label="standard normal", color="gray", ls=":", lw=1.2)
        ax.set(yscale="log", ylim=(1e-7, None), title=f"{kind} input, {run['name']}, step {st['step']}",
               xlabel="value / RMS of its token (ends hold the clipped tails)", ylabel="fraction of values")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return run["name"]


def render() -> str:
    FIG.mkdir(parents=True, exist_ok=True)
    lines = ["# Reproduction study: BitNet v2 at small scale on real text", "",
             "Generated by `python -m bitnet_dist.results render` from the files committed under "
             "`docs/results/data/`; only the discussion at the end is written by hand.", ""]
    runs = load_runs("repro")
    by = defaultdict(list)
    for r in runs:
        by[r["cfg"]["precision"]["name"]].append(r)
    if runs:
        cfg0 = runs[0]["cfg"]
        t, m = cfg0["trainer"], cfg0["model"]
        tokens = t["max_steps"] * t["global_batch_size"] * t["seq_length"]
        lines += [f"Model `{m['name']}` (hidden {m['hidden_size']}, ffn {m['ffn_hidden_size']}, {m['num_layers']} layers, "
                  f"{m['num_attention_heads']} heads, Hadamard block {m['hadamard_block']}), data `{cfg0['data']['name']}`, "
                  f"{t['max_steps']} steps x {t['global_batch_size']} x {t['seq_length']} = {tokens / 1e6:.2f} M tokens per run, "
                  f"same data order, schedule and seeds for every variant; torch reference numerics "
                  f"(`precision.kernels={cfg0['precision'].get('kernels')}`).", ""]
        lines += ["## Final validation perplexity", "",
                  "| variant | runs (seeds) | val ppl (mean ± half-range) | val ppl per seed | final train loss "
                  "| tokens/s, GPU shared (median) | status |",
                  "|---|---|---|---|---|---|---|"]
        summary = {}
        for v in VARIANTS:
            rs = by.get(v, [])
            if not rs:
                continue
            ppl = _mean_spread([final_val_ppl(r["recs"]) for r in rs])
            loss = _mean_spread([last(r["recs"], "loss") for r in rs])
            tps = [x for r in rs for _, x in series(r["recs"], "tokens_per_s")]
            summary[v] = ppl
            seeds = ",".join(str(seed(r)) for r in sorted(rs, key=seed))
            status = "; ".join(sorted({r["status"] for r in rs}))
            tps_s = f"{statistics.median(tps):,.0f}" if tps else "n/a"
            lines.append(f"| `{v}` | {len(rs)} ({seeds}) | {_fmt(*ppl)} | {_per_seed(rs)} | {_fmt(*loss, 3)} | {tps_s} | {status} |")
        missing = [v for v in VARIANTS if v not in by]
        if missing:
            lines += ["", f"Not measured (no run reached its end): {', '.join(f'`{v}`' for v in missing)}."]
        n_jobs = _n_jobs("repro")
        lines += ["", "Half-range = (max - min) / 2 over the seeds. The tokens/s column is the median of what the runs "
                  f"logged while {n_jobs or 'several'} runs of the sweep shared one GPU and its host's CPU cores: it says "
                  "nothing about a variant's own speed (see [standalone throughput](#standalone-throughput)).", ""]
        lines += ["### The paper's ordering, checked on these numbers", "",
                  "`<` and `<<` *hold* when the second mean exceeds the first by more than the sum of the two "
                  "half-ranges (the seed spread), `<=` unless it is reversed by more than that, `~` when the gap is "
                  "within the seed spread or 2 %. The per-seed differences compare runs with the same seed (same "
                  "initialization and data order).", ""]
        lines += _ordering(summary, by)
        lines += _switch_table(by)
        _plot_curves({v: by[v] for v in VARIANTS if v in by}, FIG / "curves.png", "repro", zoom=True)
        lines += ["", "![loss and validation perplexity](results/curves.png)", ""]
        lines += _stats_table(by)
        hist_run = _plot_hist([r for v in ("v2_a4", "v2_a8", "v2_a8_to_a4") for r in sorted(by.get(v, []), key=seed)],
                              FIG / "hist.png")
        if hist_run:
            lines += [f"Histograms of the two inputs in `{hist_run}` at its last stats step (values divided by the RMS "
                      "of their token, all layers and tokens of the step):", "",
                      "![activation histograms](results/hist.png)", ""]
    lines += _blocks_section(by.get("v2_a4", []))
    lines += _bench_section()
    lines += _repro_section()
    lines += ["## Regenerate", "", "On one GPU (about 6 minutes of an H100 80GB), from the repository root:", "",
              "```bash", *REGENERATE, "```", ""]
    old = DOC.read_text() if DOC.exists() else ""
    disc = old[old.index(BEGIN): old.index(END) + len(END)] if BEGIN in old and END in old else \
        f"{BEGIN}\n## Discussion\n\n(to be written from the numbers above)\n{END}"
    lines += [disc, ""]
    text = "\n".join(lines)
    DOC.write_text(text)
    return text


REGENERATE = [
    "bash tools/repro/gpu_run.sh    # on the GPU machine: both sweeps (6 runs at a time) + the standalone benchmark;",
    "                               # writes out/runs.tgz and out/bench25m.jsonl. Needs .whl/*.whl and the Brown",
    "                               # tarball in .cache/bitnet_dist/ carried along (no network): see the script's header",
    ". launch/env.sh                                        # back on the repository's machine: the .venv",
    "mkdir -p /tmp/rr && tar xzf out/runs.tgz -C /tmp/rr",
    "rm -r docs/results/data/repro docs/results/data/repro_blocks",
    "python -m bitnet_dist.results collect /tmp/rr/runs/repro /tmp/rr/runs/repro_blocks",
    "cp out/bench25m.jsonl docs/results/data/",
    "python -m bitnet_dist.results render",
]


def _n_jobs(exp: str):
    """joblib's concurrency of an experiment (its hydra.launcher.n_jobs), read from conf/experiment/<exp>.yaml."""
    f = conf_file("experiment", f"{exp}.yaml")
    try:
        return yaml.safe_load(f.read_text())["hydra"]["launcher"]["n_jobs"]
    except (OSError, KeyError, TypeError):
        return None


def _ordering(s: dict, by: dict) -> list[str]:
    """bf16 <= b158 ~ v2_a8 < v2_a8_to_a4 (small gap), v2_a8 < v2_a4, v2_a4 << a4 without Hadamard, each checked."""
    def m(v):
        return s.get(v, (float("nan"), 0))

    def paired(a, b):
        pa = {seed(r): final_val_ppl(r["recs"]) for r in by.get(a, [])}
        pb = {seed(r): final_val_ppl(r["recs"]) for r in by.get(b, [])}
        return {k: pb[k] - pa[k] for k in sorted(pa) if k in pb}

    def rel(a, b, kind, note=""):
        (ma, sa), (mb, sb) = m(a), m(b)
        if not (math.isfinite(ma) and math.isfinite(mb)):
            return f"- `{a}` vs `{b}`: not measured"
        gap = mb - ma
        noise = sa + sb
        d = paired(a, b)
        same_sign = bool(d) and (all(x > 0 for x in d.values()) or all(x < 0 for x in d.values()))
        if kind == "<=":
            verdict = "holds" if gap >= -noise else "does not hold (reversed beyond the seed spread)"
        elif kind == "~":
            verdict = "holds" if abs(gap) <= max(noise, 0.02 * ma) else "does not hold (gap beyond the seed spread)"
        elif gap > noise:
            verdict = "holds"
        elif gap < -noise:
            verdict = "does not hold (reversed beyond the seed spread)"
        else:
            verdict = "not resolved (within the seed spread" + \
                      (f"; in the {'expected' if gap > 0 else 'opposite'} direction in every seed pair)" if same_sign else ")")
        ds = ", ".join(f"seed {k} {x:+.2f}" for k, x in d.items())
        return (f"- `{a}` {kind} `{b}`{note}: {ma:.2f} vs {mb:.2f} (difference {gap:+.2f} = {100 * gap / ma:+.1f} %, "
                f"seed spread {noise:.2f}; per seed: {ds}) -> **{verdict}**")

    return [rel("bf16", "b158", "<="), rel("b158", "v2_a8", "~"),
            rel("v2_a8", "v2_a8_to_a4", "<", " (small gap; the paper's v2 a4)"),
            rel("v2_a8", "v2_a4", "<", " (INT4 from the first step: stricter than the paper)"),
            rel("v2_a4", "v2_a4_no_hadamard", "<<")]


def _switch_table(by: dict) -> list[str]:
    rs = sorted(by.get("v2_a8_to_a4", []), key=seed)
    if not rs:
        return []
    ref = {seed(r): final_val_ppl(r["recs"]) for r in by.get("v2_a8", [])}
    out = ["", "### The 8->4 transition", "",
           "`v2_a8_to_a4` evaluates just before and just after switching its activations to 4 bits; `v2_a8` is the "
           "same config and seed without the switch.", "",
           "| seed | switch step | val ppl before switch | right after switch | final | final `v2_a8` (same seed) "
           "| cost of the switch at the end |", "|---|---|---|---|---|---|---|"]
    for r in rs:
        sw, fin = switch_step(r["recs"]), final_val_ppl(r["recs"])
        b, a = last(r["recs"], "val_ppl_before_switch"), last(r["recs"], "val_ppl_after_switch")
        a8 = ref.get(seed(r))
        cost = f"{fin - a8:+.2f} ({100 * (fin - a8) / a8:+.2f} %)" if a8 else "n/a"
        out.append(f"| {seed(r)} | {sw} of {r['cfg']['trainer']['max_steps']} | {_f(b, 2)} | {_f(a, 2)} | {fin:.2f} "
                   f"| {_f(a8, 2)} | {cost} |")
    return out


def _stats_table(by: dict) -> list[str]:
    out = ["## Activation statistics of the Wo / Wdown inputs", "",
           "Kurtosis (per token over its features; Gaussian = 3), outlier ratio (values beyond 6 standard deviations "
           "of their token) before and after the Hadamard transform, and the relative L2 error of quantizing the "
           "layer's actual input (after the transform, where there is one) to INT4 / INT8, as logged by the telemetry "
           "probe (docs/telemetry.md) at the last stats step; mean over the seeds. Variants without the transform "
           "show '-' after it.", "",
           "| variant | layer | step | kurtosis before | kurtosis after | outlier ratio before | outlier ratio after "
           "| INT4 error | INT8 error |", "|---|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        rs = by.get(v, [])
        had = bool(rs) and rs[0]["cfg"]["precision"].get("hadamard", True)
        for kind in ("wo", "wdown"):
            if not any(_last_stats(r, kind) for r in rs):
                continue
            step = max(_last_stats(r, kind)["step"] for r in rs if _last_stats(r, kind))

            def f(k, d=3, post=False, had=had, rs=rs, kind=kind):
                return "-" if post and not had else _f(_stat_mean(rs, kind, k), d)
            out.append(f"| `{v}` | {kind} | {step} | {f('kurtosis_pre', 1)} | {f('kurtosis_post', 1, True)} | "
                       f"{f('outlier_ratio_pre', 4)} | {f('outlier_ratio_post', 4, True)} | {f('qerr_int4')} | {f('qerr_int8')} |")
    return out + [""]


def _tp_degrees(block: int, m: dict) -> str:
    """TP degrees at which the block divides each rank's slice of the Wo and Wdown inputs (and TP divides the heads)."""
    if block == 0:
        return "1"
    ok = [t for t in (1, 2, 4, 8, 16, 32) if m["num_attention_heads"] % t == 0
          and m["hidden_size"] % t == 0 and (m["hidden_size"] // t) % block == 0 and (m["ffn_hidden_size"] // t) % block == 0]
    return ", ".join(map(str, ok)) or "none"


def _blocks_section(a4_runs: list[dict]) -> list[str]:
    blocks = load_runs("repro_blocks")
    if not blocks:
        return []
    byb = defaultdict(list)
    for r in blocks:
        byb[r["cfg"]["model"]["hadamard_block"]].append(r)
    src = {b: "`repro_blocks`" for b in byb}
    for r in a4_runs:  # the repro experiment's v2_a4 is the same run at its block size (not rerun by repro_blocks)
        b = r["cfg"]["model"]["hadamard_block"]
        if b not in src or src[b] == "`repro`":
            byb[b].append(r)
            src[b] = "`repro`"
    m = blocks[0]["cfg"]["model"]
    out = ["## Hadamard block size (`v2_a4`)", "",
           "Tensor parallelism splits the Wo / Wdown inputs over the ranks, so the transform must be block-diagonal "
           "with a block that divides each rank's slice. How much does the block size cost? Wdown statistics as in "
           "the table above (last stats step, mean over the seeds).", "",
           "| hadamard_block | from | runs | val ppl (mean ± half-range) | val ppl per seed | Wdown kurtosis after "
           "| Wdown outlier ratio after | Wdown INT4 error | Wo INT4 error "
           f"| TP degrees it allows ({m['name']}: hidden {m['hidden_size']}, ffn {m['ffn_hidden_size']}, "
           f"{m['num_attention_heads']} heads) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in sorted(byb, key=lambda x: (x == 0, x)):
        rs = byb[b]
        label = f"full dimension (0: {m['hidden_size']} / {m['ffn_hidden_size']})" if b == 0 else str(b)
        out.append(f"| {label} | {src[b]} | {len(rs)} | {_fmt(*_mean_spread([final_val_ppl(r['recs']) for r in rs]))} "
                   f"| {_per_seed(rs)} | {_f(_stat_mean(rs, 'wdown', 'kurtosis_post'), 1)} "
                   f"| {_f(_stat_mean(rs, 'wdown', 'outlier_ratio_post'), 4)} | {_f(_stat_mean(rs, 'wdown', 'qerr_int4'))} "
                   f"| {_f(_stat_mean(rs, 'wo', 'qerr_int4'))} | {_tp_degrees(b, m)} |")
    order = sorted(byb, key=lambda x: (x == 0, x))
    _plot_curves({f"block {b or 'full'}": byb[b] for b in order}, FIG / "blocks.png", "v2_a4 block size")
    return out + ["", "![block size curves](results/blocks.png)", ""]


def _bench_section() -> list[str]:
    f = DATA / BENCH
    if not f.exists():
        return []
    recs = {r["precision"]: r for r in read_jsonl(f)}
    r0 = next(iter(recs.values()))
    base = recs.get("bf16", {}).get("tokens_per_s")
    out = ["## Standalone throughput", "",
           f"One variant at a time on the GPU (`docs/results/data/{BENCH}`): {r0['device']}, {r0['date']}, torch "
           f"{r0['torch']}, model `{r0['model']}`, sequence {r0['seq']}, micro-batch {r0['mbs']}, kernels "
           f"`{r0['kernels']}` (the torch reference numerics the study trains with: unfused fake quantization and "
           "Hadamard in eager PyTorch, not the Triton kernels of docs/kernels.md). Each number is the mean over the "
           "timed steps after the warm-up steps given in the command:", "",
           "```bash", f"python {r0['command']}", "```", "",
           "| variant | tokens/s | step (ms) | relative to bf16 | peak memory (GiB) |", "|---|---|---|---|---|"]
    for v in [*VARIANTS, *sorted(set(recs) - set(VARIANTS))]:
        if v in recs:
            r = recs[v]
            rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
            out.append(f"| `{v}` | {r['tokens_per_s']:,.0f} | {1000 * r['step_s']:.1f} | {rel} | {r['peak_mem_gib']:.2f} |")
    if "v2_a8_to_a4" not in recs and "v2_a8" in recs and "v2_a4" in recs:
        out += ["", "`v2_a8_to_a4` is not measured separately: it runs as `v2_a8` for 95 % of its steps and as "
                "`v2_a4` after the switch."]
    return out + [""]


def config_sha256(cfg: dict) -> str:
    """Fingerprint of a run's saved config (the .config.json that collect writes), key order aside."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _repro_section() -> list[str]:
    f = DATA / EARLIER
    if not f.exists():
        return []
    doc = json.loads(f.read_text())
    out = ["## Reproducibility: the earlier attempt against this one", "",
           "The runs that exist in both attempts (same experiment, variant, seed and block size), final validation "
           "perplexity then and now. The seed spread is this study's half-range over the seeds of the same variant and "
           "block: a rerun should land well within it.", "",
           f"Earlier values (`docs/results/data/{EARLIER}`): {doc['note']}", "", "| run | same config | earlier val ppl | this study | difference | seed spread | within the spread "
           "| training loss at the logged steps |", "|---|---|---|---|---|---|---|---|"]
    n_in, worst = 0, 0.0
    rows = 0
    for e in doc["runs"]:
        new_file = DATA / e["experiment"] / f"{e['run']}.jsonl"
        if not new_file.exists():
            continue
        recs = read_jsonl(new_file)
        cfg = json.loads(new_file.with_suffix(".config.json").read_text())
        same_cfg = "n/a" if "config_sha256" not in e else \
            ("yes" if config_sha256(cfg) == e["config_sha256"] else "**no**")
        old_ppl = e["val_ppl"][str(max(map(int, e["val_ppl"])))]
        new_ppl = final_val_ppl(recs)
        group = [r for exp in ("repro", "repro_blocks") for r in load_runs(exp)
                 if r["cfg"]["precision"]["name"] == cfg["precision"]["name"]
                 and r["cfg"]["model"]["hadamard_block"] == cfg["model"]["hadamard_block"]]
        spread = _mean_spread([final_val_ppl(r["recs"]) for r in group])[1]
        diff = new_ppl - old_ppl
        within = abs(diff) <= spread
        n_in += within
        rows += 1
        worst = max(worst, abs(diff) / old_ppl)
        new_loss = dict(series(recs, "loss"))
        common = [s for s in sorted(map(int, e["loss"])) if s in new_loss]
        differ = [s for s in common if new_loss[s] != e["loss"][str(s)]]
        if not differ:
            loss_s = f"bit-identical at all {len(common)} logged steps"
        else:
            dmax = max(abs(new_loss[s] - e["loss"][str(s)]) for s in differ)
            prev = max([s for s in common if s < differ[0]], default=0)
            loss_s = f"identical through step {prev}, differs from step {differ[0]} on (max abs diff {dmax:.1e})"
        out.append(f"| `{e['experiment']}/{e['run']}` | {same_cfg} | {old_ppl:.4f} | {new_ppl:.4f} | {diff:+.4f} ({100 * diff / old_ppl:+.4f} %) "
                   f"| {spread:.2f} | {'yes' if within else 'no'} | {loss_s} |")
    if rows:
        out += ["", f"{n_in} of {rows} reruns land within the seed spread; the largest difference is "
                f"{100 * worst:.4f} % of the perplexity."]
    return out + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("roots", nargs="+")
    sub.add_parser("render")
    a = ap.parse_args(argv)
    if a.cmd == "collect":
        for p in collect(a.roots):
            print(p)
    else:
        render()
        print(DOC)


if __name__ == "__main__":
    main()
