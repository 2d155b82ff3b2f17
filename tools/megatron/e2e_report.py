"""End-to-end throughput report: bench.jsonl files written by `gpu_check.py bench` -> a dated report
docs/benchmarks/e2e_<hardware>_<date>.json plus the table inside e2e_<hardware>_<date>.md.

    python tools/megatron/e2e_report.py out/e2e.jsonl:run1 out/e2e_graph.jsonl:run1-graph \\
        --out docs/benchmarks/e2e_h100_2026-11-25            # new report (or add rows with --keep)
    python tools/megatron/e2e_report.py --out docs/benchmarks/e2e_h100_2026-11-25   # re-render the table

Each row gets `speed_vs_bf16`: its tokens/s over the bf16 row of the same run label, model and batch shape
(rows of one bench command share a process). The table is written between the markers
`<!-- e2e table begin -->` and `<!-- e2e table end -->` of OUT.md; the text around them is left as it is
(a new OUT.md gets a heading and the markers).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- e2e table begin -->", "<!-- e2e table end -->"
HEADER = [
    "| run | model | precision | step | seq | micro x global batch | step (s) | tokens/s | TFLOP/s | MFU | vs bf16 | peak mem (GiB) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def load_rows(specs: list[str]) -> list[dict]:
    rows = []
    for spec in specs:  # FILE or FILE:run-label
        path, _, label = spec.partition(":")
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append({**json.loads(line), "run": label or Path(path).stem})
    return rows


def add_ratios(rows: list[dict]) -> None:
    def group(r):
        return (r["run"], r["model"], r.get("mbs"), r.get("gbs"))

    ok = [r for r in rows if "error" not in r]
    base = {group(r): r["tokens_per_s"] for r in ok if r["precision"] == "bf16"}
    for r in ok:
        r["speed_vs_bf16"] = r["tokens_per_s"] / base[group(r)] if group(r) in base else None


def table(rows: list[dict]) -> list[str]:
    lines = list(HEADER)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['model']} | {r['precision']} | - | - | - | failed: {r['error'][:80]} | | | | | |")
            continue
        vs = f"{r['speed_vs_bf16']:.2f}x" if r.get("speed_vs_bf16") else "-"
        fp8 = ", FP8 bwd" if r.get("fp8_backward") and r["precision"] != "bf16" else ""
        step = ("CUDA graph" if r.get("cuda_graph") else "eager") + fp8
        lines.append(f"| {r['run']} | {r['model']} | {r['precision']} | {step} | {r['seq']} | {r['mbs']} x {r['gbs']} | "
                     f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | {vs} | "
                     f"{r['peak_mem_gib']:.1f} |")
    return lines


def render_md(md: Path, rows: list[dict], meta: dict) -> str:
    block = [BEGIN, *table(rows), END]
    if md.is_file():
        text = md.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"e2e_report: {md} has no {BEGIN} / {END} markers; add them where the table goes")
        head, rest = text.split(BEGIN, 1)
        return head + "\n".join(block) + rest.split(END, 1)[1]
    title = f"# End-to-end training throughput: {meta.get('device', '?')}, {meta.get('date', '?')}"
    return "\n".join([title, "", *block, ""]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("bench", nargs="*", help="bench.jsonl files, each optionally FILE:run-label")
    p.add_argument("--out", required=True, help="report path without suffix, e.g. docs/benchmarks/e2e_h100_2026-11-25")
    p.add_argument("--keep", action="store_true", help="add the new rows to those already in OUT.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    js, md = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    rows = json.loads(js.read_text())["rows"] if (js.is_file() and (a.keep or not a.bench)) else []
    if not rows and not a.bench:
        p.error(f"no bench files given and no {js} to re-render")
    rows += load_rows(a.bench)
    add_ratios(rows)
    ok = [r for r in rows if "error" not in r]
    meta = {k: ok[0].get(k) for k in ("device", "date", "torch")} if ok else {}
    text = render_md(md, rows, meta)  # fails on a report without markers before anything is written
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md.write_text(text)
    print(f"e2e_report: {len(rows)} rows -> {js}, {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
