"""The reproduction study's evidence: collect the runs' metrics files and render docs/results.md.

    python -m bitnet_dist.results collect runs/repro runs/repro_blocks   # copy metrics into docs/results/data
    python -m bitnet_dist.results render                                 # tables + PNGs + docs/results.md

Everything in docs/results.md that is a number or a plot is computed here from the committed metrics
files (docs/results/data/<experiment>/<run>.jsonl); nothing is typed in. The hand-written discussion is
kept between the DISCUSSION markers of docs/results.md and preserved when the page is rendered again.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "results" / "data"
DOC = ROOT / "docs" / "results.md"
FIG = ROOT / "docs" / "results"
VARIANTS = ["bf16", "b158", "v2_a8", "v2_a8_to_a4", "v2_a4", "v2_a4_no_hadamard"]
BEGIN, END = "<!-- DISCUSSION BEGIN -->", "<!-- DISCUSSION END -->"


# ---------------------------------------------------------------------------------------------- collect
def _run_config(metrics: Path) -> dict:
    """The resolved config of the run that wrote ``metrics`` (train.py saves it next to the metrics)."""
    import yaml

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
def load_runs(exp: str) -> list[dict]:
    runs = []
    for f in sorted((DATA / exp).glob("*.jsonl")):
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
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


def _mean_spread(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0


def _fmt(m, s, digits=2):
    return "n/a" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _plot_curves(groups: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", ":", "-.", (0, (5, 1))]
    for g, (name, runs) in enumerate(groups.items()):
        color = colors[g % len(colors)]  # one colour per variant, one line style per seed
        for i, run in enumerate(runs):
            tok_per_step = run["cfg"]["trainer"]["global_batch_size"] * run["cfg"]["trainer"]["seq_length"]
            lo = series(run["recs"], "loss")
            vp = series(run["recs"], "val_ppl")
            kw = dict(color=color, ls=styles[i % len(styles)], alpha=0.85, lw=1.2)
            label = f"{name} (seed {run['cfg']['trainer']['seed']})"
            a1.plot([s * tok_per_step / 1e6 for s, _ in lo], [v for _, v in lo], label=label, **kw)
            a2.plot([s * tok_per_step / 1e6 for s, _ in vp], [v for _, v in vp], marker=".", **kw)
            sw = switch_step(run["recs"])
            if sw is not None:
                for ax in (a1, a2):
                    ax.axvline(sw * tok_per_step / 1e6, color=color, ls="--", lw=0.8)
    a1.set(xlabel="tokens (M)", ylabel="train loss", title=f"{title}: training loss (dashed: 8->4 switch)")
    a2.set(xlabel="tokens (M)", ylabel="validation perplexity", yscale="log", title="validation perplexity")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_hist(runs: list[dict], path: Path) -> bool:
    """Histograms of the Wo / Wdown inputs before and after the Hadamard transform (last stats record)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for kind in ("wo", "wdown"):
        for run in runs:
            rec = next((r for r in reversed(run["recs"]) if f"stats/{kind}/hist_pre" in r), None)
            if rec is not None:
                rows.append((kind, run["name"], rec[f"stats/{kind}/hist_pre"], rec.get(f"stats/{kind}/hist_post"),
                             rec.get(f"stats/{kind}/hist_edges")))
                break
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4))
    axes = axes if len(rows) > 1 else [axes]
    for ax, (kind, name, pre, post, edges) in zip(axes, rows):
        n = len(pre)
        xs = edges[:-1] if edges else list(range(n))
        ax.step(xs, pre, where="post", label="before Hadamard")
        if post:
            ax.step(xs, post, where="post", label="after Hadamard")
        ax.set(yscale="log", title=f"{kind} input ({name})", xlabel="value / per-token RMS", ylabel="fraction")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render() -> str:
    FIG.mkdir(parents=True, exist_ok=True)
    lines = ["# Reproduction study: BitNet v2 at small scale on real text", "",
             "Generated by `python -m bitnet_dist.results render` from the metrics files committed under "
             "`docs/results/data/`; the discussion section is written by hand.", ""]
    runs = load_runs("repro")
    if runs:
        cfg0 = runs[0]["cfg"]
        t, m = cfg0["trainer"], cfg0["model"]
        tokens = t["max_steps"] * t["global_batch_size"] * t["seq_length"]
        lines += [f"Model `{m['name']}` (hidden {m['hidden_size']}, ffn {m['ffn_hidden_size']}, {m['num_layers']} layers, "
                  f"{m['num_attention_heads']} heads, Hadamard block {m['hadamard_block']}), "
                  f"{t['max_steps']} steps x {t['global_batch_size']} x {t['seq_length']} = {tokens / 1e6:.2f} M tokens per run, "
                  f"same data order, schedule and seeds for every variant.", ""]
        by = defaultdict(list)
        for r in runs:
            by[r["cfg"]["precision"]["name"]].append(r)
        lines += ["## Final validation perplexity", "",
                  "| variant | runs (seeds) | val ppl (mean ± half-range) | final train loss | tokens/s (median) | status |",
                  "|---|---|---|---|---|---|"]
        summary = {}
        for v in VARIANTS:
            rs = by.get(v, [])
            if not rs:
                continue
            ppl = _mean_spread([final_val_ppl(r["recs"]) for r in rs])
            loss = _mean_spread([last(r["recs"], "loss") for r in rs])
            tps = [x for r in rs for _, x in series(r["recs"], "tokens_per_s")]
            summary[v] = ppl
            seeds = ",".join(str(r["cfg"]["trainer"]["seed"]) for r in rs)
            status = "; ".join(sorted({r["status"] for r in rs}))
            tps_s = f"{statistics.median(tps):,.0f}" if tps else "n/a"
            lines.append(f"| `{v}` | {len(rs)} ({seeds}) | {_fmt(*ppl)} | {_fmt(*loss, 3)} | {tps_s} | {status} |")
        missing = [v for v in VARIANTS if v not in by]
        if missing:
            lines += ["", f"Not measured (no run reached its end): {', '.join(f'`{v}`' for v in missing)}."]
        lines += ["", "### The paper's ordering, checked on these numbers", ""]
        lines += _ordering(summary)
        _plot_curves({v: by[v] for v in VARIANTS if v in by}, FIG / "curves.png", "repro")
        lines += ["", "![loss and validation perplexity](results/curves.png)", ""]
        lines += _stats_table(by)
        if _plot_hist([r for v in ("v2_a4", "v2_a8_to_a4", "v2_a8") for r in by.get(v, [])], FIG / "hist.png"):
            lines += ["", "![activation histograms](results/hist.png)", ""]
    blocks = load_runs("repro_blocks")
    if blocks:
        lines += ["## Hadamard block size (`v2_a4`)", "",
                  "Tensor parallelism needs a block-diagonal transform; how much does the block size cost?", "",
                  "| hadamard_block | runs | val ppl (mean ± half-range) |", "|---|---|---|"]
        byb = defaultdict(list)
        for r in blocks:
            byb[r["cfg"]["model"]["hadamard_block"]].append(r)
        for b in sorted(byb, key=lambda x: (x == 0, x)):
            label = "full dimension (0)" if b == 0 else str(b)
            lines.append(f"| {label} | {len(byb[b])} | {_fmt(*_mean_spread([final_val_ppl(r['recs']) for r in byb[b]]))} |")
        _plot_curves({f"block {b or 'full'}": byb[b] for b in sorted(byb)}, FIG / "blocks.png", "v2_a4 block size")
        lines += ["", "![block size curves](results/blocks.png)", ""]
    lines += ["## Regenerate", "", "```bash", *REGENERATE, "```", ""]
    old = DOC.read_text() if DOC.exists() else ""
    disc = old[old.index(BEGIN): old.index(END) + len(END)] if BEGIN in old and END in old else \
        f"{BEGIN}\n## Discussion\n\n(to be written from the numbers above)\n{END}"
    lines += [disc, ""]
    text = "\n".join(lines)
    DOC.write_text(text)
    return text


REGENERATE = [
    ". launch/env.sh                                          # the environment (.venv)",
    "python -m bitnet_dist.train -m experiment=repro          # 6 variants x 2 seeds (one GPU; joblib, 6 at a time)",
    "python -m bitnet_dist.train -m experiment=repro_blocks   # v2_a4 at three block sizes x 2 seeds",
    "python -m bitnet_dist.results collect runs/repro runs/repro_blocks",
    "python -m bitnet_dist.results render",
]


def _ordering(s: dict) -> list[str]:
    """bf16 <= b158 ~ v2_a8 < v2_a4 (small gap) << a4 without Hadamard, each relation checked."""
    def m(v):
        return s.get(v, (float("nan"), 0))

    def rel(a, b, kind):
        (ma, sa), (mb, sb) = m(a), m(b)
        if not (math.isfinite(ma) and math.isfinite(mb)):
            return f"- `{a}` vs `{b}`: not measured"
        gap = mb - ma
        noise = sa + sb
        if kind == "<=":
            ok = gap >= -noise
        elif kind == "~":
            ok = abs(gap) <= max(noise, 0.02 * ma)
        else:  # "<"
            ok = gap > noise
        return (f"- `{a}` {kind} `{b}`: {ma:.2f} vs {mb:.2f} (difference {gap:+.2f}, seed spread {noise:.2f}) "
                f"-> {'holds' if ok else 'does not hold'}")

    return [rel("bf16", "b158", "<="), rel("b158", "v2_a8", "~"), rel("v2_a8", "v2_a8_to_a4", "<"),
            rel("v2_a8", "v2_a4", "<"), rel("v2_a4", "v2_a4_no_hadamard", "<")]


def _stats_table(by: dict) -> list[str]:
    out = ["## Activation statistics of the Wo / Wdown inputs (last stats step)", "",
           "Kurtosis (Gaussian = 3) and outlier ratio before and after the Hadamard transform, as logged by the "
           "telemetry probe (docs/telemetry.md).", "",
           "| variant | layer | kurtosis before | kurtosis after | outlier ratio before | outlier ratio after | INT4 error | INT8 error |",
           "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        for kind in ("wo", "wdown"):
            vals = defaultdict(list)
            for r in by.get(v, []):
                rec = next((x for x in reversed(r["recs"]) if f"stats/{kind}/kurtosis_pre" in x), None)
                if rec:
                    for k in ("kurtosis_pre", "kurtosis_post", "outlier_ratio_pre", "outlier_ratio_post",
                              "qerr_int4", "qerr_int8"):
                        if f"stats/{kind}/{k}" in rec:
                            vals[k].append(rec[f"stats/{kind}/{k}"])
            if vals:
                def f(k, d=3):
                    return f"{statistics.fmean(vals[k]):.{d}f}" if vals.get(k) else "n/a"
                out.append(f"| `{v}` | {kind} | {f('kurtosis_pre', 1)} | {f('kurtosis_post', 1)} | "
                           f"{f('outlier_ratio_pre', 4)} | {f('outlier_ratio_post', 4)} | {f('qerr_int4')} | {f('qerr_int8')} |")
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
