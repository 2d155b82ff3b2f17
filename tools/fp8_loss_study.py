"""The loss cost of precision.fp8_backward, measured at the CLI: pairs of train-app runs on real text that differ only
in the backward GEMMs' precision (bf16, the exact path, against FP8), and a summary of their curves.

    python tools/fp8_loss_study.py run DIR [--model 25M] [--precision v2_a4] [--steps 2000] [--seeds 1 2]
                                   [--train-args OVERRIDE ...]
    python tools/fp8_loss_study.py summarize DIR [--out-md FILE]

``run`` starts every run at once (each is small; one GPU holds them all) as ``python -m bitnet_dist.train
experiment=quickstart`` (the bundled Brown corpus, its 4096-token BPE, seq 256, 8 sequences per step) with
``model=``, ``precision=``, ``trainer.max_steps=`` and ``trainer.seed=`` set, a record every step, validation every
``--steps / 10`` steps on the held-out split, no checkpoints, into DIR/<precision>_s<seed>_<bf16bwd|fp8bwd>/. Same
seed = same initial weights and batches. ``summarize`` reads each run's metrics.jsonl and writes DIR/fp8_loss.json
and DIR/fp8_loss.md: per seed the final validation loss of both runs and their relative difference, whether the
first logged step's loss agrees (step 1: the forward does not depend on the option), the median ratio of the two
runs' gradient norms at the same step (over the run and over its first 10 steps), the largest relative gap between
the smoothed training curves, and both validation curves; across seeds the mean and spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ARMS = {"bf16bwd": "false", "fp8bwd": "true"}


def run_name(precision: str, seed: int, arm: str) -> str:
    return f"{precision}_s{seed}_{arm}"


def train_command(run_dir: Path, *, model: str, precision: str, steps: int, seed: int, fp8: str,
                  extra: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "bitnet_dist.train", "experiment=quickstart", f"model={model}",
            f"precision={precision}", f"precision.fp8_backward={fp8}", f"trainer.max_steps={steps}",
            f"trainer.seed={seed}", f"trainer.eval_interval={max(1, steps // 10)}", "trainer.log_interval=1",
            "trainer.checkpoints=false", "trainer.report=false", "trainer.progress_bar=false",
            "trainer.stats_interval=0", "logging.wandb=disabled", f"run_dir={run_dir}", *extra]


def run(args) -> int:
    args.dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for seed in args.seeds:
        for arm, fp8 in ARMS.items():
            d = args.dir / run_name(args.precision, seed, arm)
            cmd = train_command(d, model=args.model, precision=args.precision, steps=args.steps, seed=seed, fp8=fp8,
                                extra=tuple(args.train_args))
            log = open(args.dir / f"{d.name}.log", "w")
            procs.append((d.name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                   env=dict(os.environ, WANDB_MODE="disabled")), log))
    failed = []
    for name, p, log in procs:
        if p.wait() != 0:
            failed.append(name)
        log.close()
    if failed:
        print(f"fp8_loss_study: {len(failed)} run(s) failed: {', '.join(failed)} (logs in {args.dir})", file=sys.stderr)
        return 1
    return summarize(args)


def read_run(d: Path) -> dict:
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and "event" not in r and r.get("loss") is not None]
    train = [(r["step"], r["loss"]) for r in steps]
    gnorm = {r["step"]: r["grad_norm"] for r in steps if isinstance(r.get("grad_norm"), (int, float))}
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not train or not val:
        raise ValueError(f"{d}: no training or validation records in metrics.jsonl")
    return {"train": train, "val": val, "grad_norm": gnorm}


def smooth(points: list[tuple[int, float]], width: int = 5) -> list[float]:
    ys = [y for _, y in points]
    return [statistics.fmean(ys[max(0, i - width + 1):i + 1]) for i in range(len(ys))]


def summarize_dir(root: Path) -> dict:
    pairs: dict[tuple[str, int], dict[str, dict]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file()):
        prec, _, rest = d.name.rpartition("_s")
        seed, _, arm = rest.partition("_")
        if arm in ARMS and seed.isdigit():
            pairs.setdefault((prec, int(seed)), {})[arm] = read_run(d)
    seeds = []
    for (prec, seed), pair in sorted(pairs.items()):
        if set(pair) != set(ARMS):
            continue
        a, b = pair["bf16bwd"], pair["fp8bwd"]
        n = min(len(a["train"]), len(b["train"]))
        sa, sb = smooth(a["train"][:n]), smooth(b["train"][:n])
        va, vb = a["val"][-1][1], b["val"][-1][1]
        both = sorted(set(a.get("grad_norm", {})) & set(b.get("grad_norm", {})))
        ratios = [b["grad_norm"][st] / a["grad_norm"][st] for st in both if a["grad_norm"][st] > 0]
        seeds.append({"precision": prec, "seed": seed, "steps": a["train"][n - 1][0],
                      "first_step": a["train"][0][0], "first_loss_equal": a["train"][0][1] == b["train"][0][1],
                      # the gradient norms of the same step (FP8 / bf16 backward): a scale error shows as a ratio
                      # far from 1 from the first steps on, noise as a spread around 1
                      "grad_norm_ratio_median": statistics.median(ratios) if ratios else None,
                      "grad_norm_ratio_first10_median": statistics.median(ratios[:10]) if ratios else None,
                      "final_val_bf16bwd": va, "final_val_fp8bwd": vb, "final_val_rel_diff": (vb - va) / va,
                      "max_rel_gap_smoothed_train": max(abs(x - y) / abs(x) for x, y in zip(sa, sb)),
                      "val_curve_bf16bwd": a["val"], "val_curve_fp8bwd": b["val"]})
    out = {"seeds": seeds}
    if seeds:
        diffs = [s["final_val_rel_diff"] for s in seeds]
        out["final_val_rel_diff_mean"] = statistics.fmean(diffs)
        out["final_val_rel_diff_max_abs"] = max(abs(x) for x in diffs)
        if len(seeds) > 1:
            base = [s["final_val_bf16bwd"] for s in seeds]
            out["seed_spread_bf16bwd_rel"] = (max(base) - min(base)) / statistics.fmean(base)
    return out


def to_markdown(res: dict, meta: str = "") -> str:
    lines = ["# Loss cost of precision.fp8_backward", ""] + ([meta, ""] if meta else [])
    lines += ["| precision | seed | steps | first logged step: loss equal | final val loss, bf16 backward | final val "
              "loss, FP8 backward | relative difference | largest gap, smoothed train curves | grad norm FP8 / bf16 "
              "(median; first 10 steps) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in res["seeds"]:
        gn = ("-" if s.get("grad_norm_ratio_median") is None else
              f"{s['grad_norm_ratio_median']:.3f}; {s['grad_norm_ratio_first10_median']:.3f}")
        lines.append(f"| {s['precision']} | {s['seed']} | {s['steps']} | step {s.get('first_step', '?')}: "
                     f"{'yes' if s['first_loss_equal'] else 'no'} | "
                     f"{s['final_val_bf16bwd']:.4f} | {s['final_val_fp8bwd']:.4f} | {100 * s['final_val_rel_diff']:+.2f}% | "
                     f"{100 * s['max_rel_gap_smoothed_train']:.2f}% | {gn} |")
    if res.get("seeds"):
        lines += ["", f"Mean relative difference of the final validation loss (FP8 - bf16): "
                      f"{100 * res['final_val_rel_diff_mean']:+.2f}%; largest {100 * res['final_val_rel_diff_max_abs']:.2f}%"
                  + (f"; seed-to-seed spread of the bf16-backward runs {100 * res['seed_spread_bf16bwd_rel']:.2f}%."
                     if "seed_spread_bf16bwd_rel" in res else ".")]
        lines += ["", "Validation curves (step: bf16 backward / FP8 backward):", ""]
        for s in res["seeds"]:
            pts = [f"{st}: {x:.3f} / {y:.3f}" for (st, x), (_, y) in zip(s["val_curve_bf16bwd"], s["val_curve_fp8bwd"])]
            lines.append(f"* {s['precision']} seed {s['seed']}: " + "; ".join(pts))
    return "\n".join(lines) + "\n"


def summarize(args) -> int:
    res = summarize_dir(args.dir)
    if not res["seeds"]:
        print(f"fp8_loss_study: no complete bf16bwd / fp8bwd pair under {args.dir}", file=sys.stderr)
        return 1
    (args.dir / "fp8_loss.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res, getattr(args, "meta", "") or "")
    (args.out_md or args.dir / "fp8_loss.md").write_text(md)
    print(md)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fp8_loss_study.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the pairs, then summarize")
    r.add_argument("dir", type=Path)
    r.add_argument("--model", default="25M")
    r.add_argument("--precision", default="v2_a4")
    r.add_argument("--steps", type=int, default=2000)
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    r.add_argument("--train-args", nargs="*", default=[], help="more train-app overrides for every run")
    r.add_argument("--out-md", type=Path)
    r.add_argument("--meta", default="", help="a line for the report (device, command)")
    s = sub.add_parser("summarize", help="summarize the runs under DIR")
    s.add_argument("dir", type=Path)
    s.add_argument("--out-md", type=Path)
    s.add_argument("--meta", default="")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else summarize(args)


if __name__ == "__main__":
    sys.exit(main())
