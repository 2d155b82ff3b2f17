"""Effect of precision.fp8_backward on the loss, over seeds: reads the curves that `gpu_check.py curve` wrote as
DIR/<precision>_s<seed>_<bf16bwd|fp8bwd>.json (same seed = same init and batches, the backward GEMMs' precision the
only difference) and writes DIR/fp8_loss.json and DIR/fp8_loss.md.

Per precision and seed: whether step 0 agrees bit for bit (the forward does not depend on the option), the mean
train loss over the last `--tail` steps and the held-out loss of each run, their paired difference (FP8 - bf16) and
the largest relative gap between the two curves. Across seeds: mean and sample standard deviation of each, so the
FP8 effect can be set against the seed-to-seed spread.

Usage: python tools/megatron/fp8_loss_summary.py DIR [--tail 20]"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def load(path: Path) -> dict:
    d = json.loads(path.read_text())
    losses = [r["loss"] for r in d["rows"] if "loss" in r]
    ev = next(r["eval_loss"] for r in d["rows"] if "eval_loss" in r)
    return {"losses": losses, "eval": ev, "model": d["model"], "device": d.get("device"), "seq": d["seq"],
            "gbs": d["gbs"], "lr": d["lr"]}


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(root: Path, tail: int) -> dict:
    runs: dict[tuple[str, int], dict[str, dict]] = {}
    for p in sorted(root.glob("*_s*_*bwd.json")):
        m = re.fullmatch(r"(.+)_s(\d+)_(bf16bwd|fp8bwd)\.json", p.name)
        if m:
            runs.setdefault((m[1], int(m[2])), {})[m[3]] = load(p)
    out = {"tail": tail, "precisions": {}}
    for (prec, seed), pair in sorted(runs.items()):
        if set(pair) != {"bf16bwd", "fp8bwd"}:
            continue
        a, b = pair["bf16bwd"], pair["fp8bwd"]
        n = min(len(a["losses"]), len(b["losses"]))
        ta = statistics.fmean(a["losses"][n - tail:n])
        tb = statistics.fmean(b["losses"][n - tail:n])
        row = {"seed": seed, "steps": n, "step0_equal": a["losses"][0] == b["losses"][0],
               "step0_bf16": a["losses"][0], "step0_fp8": b["losses"][0],
               "tail_bf16": ta, "tail_fp8": tb, "tail_diff": tb - ta,
               "eval_bf16": a["eval"], "eval_fp8": b["eval"], "eval_diff": b["eval"] - a["eval"],
               "max_rel_gap": max(abs(x - y) / abs(x) for x, y in zip(a["losses"][:n], b["losses"][:n]))}
        p = out["precisions"].setdefault(prec, {"model": a["model"], "seq": a["seq"], "gbs": a["gbs"], "lr": a["lr"],
                                                "device": a["device"], "seeds": []})
        p["seeds"].append(row)
    for p in out["precisions"].values():
        s = p["seeds"]
        for k in ("tail_bf16", "tail_fp8", "tail_diff", "eval_bf16", "eval_fp8", "eval_diff"):
            p[k + "_mean"], p[k + "_sd"] = mean_sd([r[k] for r in s])
        p["step0_all_equal"] = all(r["step0_equal"] for r in s)
    return out


def markdown(res: dict) -> str:
    t = res["tail"]
    lines = ["# precision.fp8_backward: effect on the loss over seeds", "",
             f"Same seed = same initialization and batches; only the backward GEMMs' precision differs. `tail`: mean "
             f"train loss over the last {t} steps; `eval`: held-out loss after the run; diff = FP8 - bf16.", ""]
    for prec, p in res["precisions"].items():
        lines += [f"## {prec} ({p['model']}, seq {p['seq']}, {p['gbs']} sequences per step, lr {p['lr']}, "
                  f"{p['device']})", "",
                  "| seed | steps | step 0 equal | tail bf16 bwd | tail FP8 bwd | diff | eval bf16 bwd | eval FP8 bwd "
                  "| diff | max rel. gap |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in p["seeds"]:
            lines.append(f"| {r['seed']} | {r['steps']} | {'yes' if r['step0_equal'] else 'no'} | {r['tail_bf16']:.4f} | "
                         f"{r['tail_fp8']:.4f} | {r['tail_diff']:+.4f} | {r['eval_bf16']:.4f} | {r['eval_fp8']:.4f} | "
                         f"{r['eval_diff']:+.4f} | {r['max_rel_gap']:.2%} |")
        lines.append(f"| mean +- sd | | | {p['tail_bf16_mean']:.4f} +- {p['tail_bf16_sd']:.4f} | "
                     f"{p['tail_fp8_mean']:.4f} +- {p['tail_fp8_sd']:.4f} | {p['tail_diff_mean']:+.4f} +- "
                     f"{p['tail_diff_sd']:.4f} | {p['eval_bf16_mean']:.4f} +- {p['eval_bf16_sd']:.4f} | "
                     f"{p['eval_fp8_mean']:.4f} +- {p['eval_fp8_sd']:.4f} | {p['eval_diff_mean']:+.4f} +- "
                     f"{p['eval_diff_sd']:.4f} | |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--tail", type=int, default=20)
    a = ap.parse_args(argv)
    root = Path(a.dir)
    res = summarize(root, a.tail)
    (root / "fp8_loss.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (root / "fp8_loss.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
