"""Checks on a run's metrics.jsonl for slurm/ci/cluster_tests.sh (stdlib only).

    python slurm/ci/check_metrics.py last-step RUN_DIR          -> newest step with a training loss (0 if none)
    python slurm/ci/check_metrics.py complete RUN_DIR MAX_STEPS  -> exit 0 when steps 1..MAX_STEPS each
                                                                    have exactly one training loss
    python slurm/ci/check_metrics.py same-losses REF_DIR RUN_DIR -> exit 0 when RUN_DIR's losses equal
                                                                    REF_DIR's at every step
    python slurm/ci/check_metrics.py stopped RUN_DIR            -> exit 0 when the run stopped early once and
                                                                    resumed from that step (events stop, resume)
    python slurm/ci/check_metrics.py same-wandb-run RUN_DIR     -> exit 0 when every (offline) wandb segment of
                                                                    the run, at least 2, used the id in wandb_run_id

A training-loss record is a line with a "loss" key and no "event" key (bitnet_dist.telemetry).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def records(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now (polling a live run)
                pass
    return out


def losses(run_dir: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["loss"])) for r in records(run_dir) if "loss" in r and "event" not in r]


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "last-step":
        ls = losses(args[0])
        print(max((s for s, _ in ls), default=0))
        return 0
    if cmd == "complete":
        steps = [s for s, _ in losses(args[0])]
        want = list(range(1, int(args[1]) + 1))
        if steps != want:
            dup = sorted({s for s in steps if steps.count(s) > 1})
            missing = sorted(set(want) - set(steps))
            print(f"steps not contiguous 1..{args[1]}: missing {missing}, repeated {dup}, order {steps}")
            return 1
        print(f"steps 1..{args[1]} contiguous, none repeated")
        return 0
    if cmd == "same-losses":
        ref, run = dict(losses(args[0])), dict(losses(args[1]))
        if not run or set(ref) != set(run):
            print(f"different steps: reference {sorted(ref)} vs run {sorted(run)}")
            return 1
        diff = {s: abs(ref[s] - run[s]) for s in ref}
        worst = max(diff, key=diff.get)
        print(f"{len(ref)} losses compared; max |diff| {diff[worst]:.3g} at step {worst} "
              f"(reference {ref[worst]!r}, run {run[worst]!r})")
        return 0 if diff[worst] == 0.0 else 1
    if cmd == "stopped":
        ev = [r for r in records(args[0]) if "event" in r]
        stops = [r["step"] for r in ev if r["event"] == "stop"]
        resumes = [r["step"] for r in ev if r["event"] == "resume"]
        print(f"stop events at {stops}, resume events at {resumes}")
        return 0 if stops and resumes and stops[0] in resumes else 1
    if cmd == "same-wandb-run":
        run = Path(args[0])
        id_file = run / "wandb_run_id"
        if not id_file.is_file():
            print(f"no {id_file}")
            return 1
        run_id = id_file.read_text().strip()
        segs = sorted(p.name for p in (run / "wandb").glob("*-run-*") if p.is_dir())
        same = [s for s in segs if s.endswith("-" + run_id)]
        print(f"wandb run id {run_id}; segments {segs}")
        return 0 if len(segs) >= 2 and same == segs else 1
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
