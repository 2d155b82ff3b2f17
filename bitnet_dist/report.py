"""run_dir/report.md and report.png from run_dir/metrics.jsonl (rank 0, at the end of a run).

The plot has two panels over optimizer steps: training loss, and validation perplexity (log scale)
with the unigram perplexity of the validation text as a reference line; a vertical line marks the
8 -> 4 activation-bit switch in both. Everything comes from metrics.jsonl, so a report regenerated
later (``python -m bitnet_dist.report RUN_DIR``) shows the same numbers.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl in file order; a torn last line (a crash mid-write) is ignored."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; when a step repeats, the last record wins."""
    by_step: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if "event" not in r and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def events(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("event") == name]


def plot(records: list[dict], out: Path, unigram_ppl: Optional[float], title: str) -> Path:
    import matplotlib  # deferred: matplotlib is needed only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    s, v = series(records, "loss")
    ax1.plot(s, v, label="train loss", color="C0")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    s, v = series(records, "val_ppl")
    ax2.plot(s, v, "o-", label="validation perplexity", color="C1")
    for suffix, marker in (("_before_switch", "v"), ("_after_switch", "^")):
        s2, v2 = series(records, "val_ppl" + suffix)
        if s2:
            ax2.plot(s2, v2, marker, color="C3", label="val ppl " + suffix[1:].replace("_", " "))
    if unigram_ppl:
        ax2.axhline(unigram_ppl, color="gray", ls=":", label=f"unigram ppl {unigram_ppl:.0f}")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("perplexity")
    for ev in events(records, "act_bits_switch"):
        for ax in (ax1, ax2):
            ax.axvline(ev["step"], color="C3", ls="--", lw=1,
                       label=f"{ev.get('from_bits')}->{ev.get('to_bits')} bits" if ax is ax1 else None)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _kernels_cell(records: list[dict]) -> str:
    """The kernel path of the run's start record, and of each resume where it differs (a resumed run may land on
    another machine)."""
    paths = []
    for r in records:
        if r.get("event") in ("start", "resume") and r.get("kernels"):
            p = r["kernels"] + (f" ({r['kernels_reason']})" if r.get("kernels_reason") else "")
            if not paths or paths[-1][1] != p:
                paths.append((r["step"], p))
    if not paths:
        return "not recorded"
    return "; ".join(p if i == 0 else f"from step {s}: {p}" for i, (s, p) in enumerate(paths))


def write_report(run_dir: Path | str, cfg=None, unigram_ppl: Optional[float] = None) -> Path:
    """Write run_dir/report.md and run_dir/report.png; returns the path of report.md.

    ``cfg``: the TrainConfig (for the summary; optional); ``unigram_ppl``: perplexity of the validation
    text under the training unigram distribution (the baseline a language model must beat).
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    start = events(records, "start")
    if unigram_ppl is None:  # recorded by the trainer in its "start" event
        unigram_ppl = start[0].get("unigram_ppl") if start else None
    title = run_dir.name if cfg is None else f"{cfg.model.name} / {cfg.precision.name} / {cfg.data.name}"
    png = plot(records, run_dir / "report.png", unigram_ppl, title)

    vs, vl = series(records, "val_loss")
    ls, lv = series(records, "loss")
    _, tps = series(records, "tokens_per_s")
    _, toks = series(records, "tokens")
    final_loss = vl[-1] if vl else None
    final_ppl = math.exp(final_loss) if final_loss is not None else None
    lines = [f"# Training report: {title}", "", f"Run directory: `{run_dir}`", ""]
    if cfg is not None:
        t = cfg.trainer
        lines += ["| setting | value |", "|---|---|",
                  f"| model | {cfg.model.name} (hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers) |",
                  f"| precision | {cfg.precision.name} (act_bits {cfg.precision.act_bits}"
                  + (f" -> {cfg.precision.final_act_bits} at {cfg.precision.switch_fraction:.0%} of tokens)"
                     if cfg.precision.final_act_bits else ")") + " |",
                  f"| data | {cfg.data.name} (tokenizer {cfg.data.tokenizer}) |",
                  f"| engine / parallel | {start[0].get('engine', cfg.engine.name) if start else cfg.engine.name}"
                  f" ({start[0].get('world_size', '?') if start else '?'} processes) / TP {cfg.parallel.tensor}, PP {cfg.parallel.pipeline}, "
                  f"ZeRO {cfg.parallel.zero_stage} |",
                  f"| steps x batch x seq | {t.max_steps} x {t.global_batch_size} x {t.seq_length} |",
                  f"| schedule | {cfg.optim.schedule}, lr {cfg.optim.lr:g}"
                  + (f" -> {cfg.optim.lr_stage2:g}" if cfg.optim.schedule == "two_stage" else "")
                  + f", warm-up {cfg.optim.warmup_steps} |", ""]
    lines += ["| result | value |", "|---|---|",
              f"| final validation loss | {_fmt(final_loss)} |",
              f"| final validation perplexity | {_fmt(final_ppl, '.2f')} |",
              f"| unigram perplexity of the validation text | {_fmt(unigram_ppl, '.2f')} |"]
    if final_ppl and unigram_ppl:
        lines.append(f"| perplexity / unigram perplexity | {final_ppl / unigram_ppl:.3f} |")
    lines += [f"| final training loss (step {ls[-1] if ls else 'n/a'}) | {_fmt(lv[-1] if lv else None)} |",
              f"| tokens trained | {int(toks[-1]) if toks else 'n/a'} |",
              f"| median tokens/s | {_fmt(statistics.median(tps) if tps else None, '.0f')} |",
              f"| kernel path | {_kernels_cell(records)} |"]
    for ev in events(records, "act_bits_switch"):
        step = ev["step"]
        before = [r for r in records if r.get("step") == step and "val_ppl_before_switch" in r]
        after = [r for r in records if r.get("step") == step and "val_ppl_after_switch" in r]
        lines.append(f"| act_bits switch {ev.get('from_bits')} -> {ev.get('to_bits')} | step {step}, "
                     f"val ppl {_fmt(before[-1]['val_ppl_before_switch'] if before else None, '.2f')} -> "
                     f"{_fmt(after[-1]['val_ppl_after_switch'] if after else None, '.2f')} |")
    if vs:
        lines += ["", "Validation curve:", "", "| step | val loss | val ppl |", "|---|---|---|"]
        lines += [f"| {s} | {v:.4f} | {math.exp(v):.2f} |" for s, v in zip(vs, vl)]
    lines += ["", f"![loss and validation perplexity]({png.name})", "",
              "Metrics: `metrics.jsonl` (one JSON record per line); the plot marks the activation-bit switch.", ""]
    md = run_dir / "report.md"
    md.write_text("\n".join(lines))
    return md


if __name__ == "__main__":  # python -m bitnet_dist.report RUN_DIR
    print(write_report(sys.argv[1]))
