#!/usr/bin/env bash
# The train app on one GPU with and without engine.cuda_graph (tiny model, synthetic tokens, the 8 -> 4-bit switch,
# evaluations, statistics probes, checkpoints), plus a graph run stopped at step 15 and resumed, plus a graph run
# without statistics probes: prints the loss records of each and whether they are equal (loss / grad norm / val
# loss; the unprobed run lacks only the probes).
#
#   bash tools/megatron/graph_app_check.sh       (one GPU, repository root, bitnet-dist installed)
#
# The run directories and logs go to $OUT (default ./out/graph_app_check).
case "${1:-}" in -h|--help) sed -n '2,9p' "$0"; exit 0;; esac
set -u
OUT=${OUT:-$PWD/out/graph_app_check}; mkdir -p "$OUT"
A="python -m bitnet_dist.train experiment=smoke precision=v2_a8_to_a4 engine=megatron trainer.max_steps=30
   precision.switch_fraction=0.5 trainer.stats_interval=7 trainer.save_interval=10 logging.wandb=disabled
   trainer.progress_bar=false trainer.report=false"
$A engine.cuda_graph=false run_dir=$OUT/eager > $OUT/eager.log 2>&1; echo "eager rc=$?"
$A engine.cuda_graph=true run_dir=$OUT/graph > $OUT/graph.log 2>&1; echo "graph rc=$?"
$A engine.cuda_graph=true run_dir=$OUT/resumed trainer.exit_after_steps=15 > $OUT/resumed1.log 2>&1; echo "resumed part 1 rc=$?"
$A engine.cuda_graph=true run_dir=$OUT/resumed > $OUT/resumed2.log 2>&1; echo "resumed part 2 rc=$?"
$A engine.cuda_graph=true run_dir=$OUT/noprobe trainer.stats_interval=0 > $OUT/noprobe.log 2>&1; echo "noprobe rc=$?"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def recs(name):
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {(r["step"], k): r[k] for r in rows for k in ("loss", "grad_norm", "val_loss") if k in r}
e, g, r, n = recs("eager"), recs("graph"), recs("resumed"), recs("noprobe")
print("records:", len(e), len(g), len(r), len(n))
for name, other in (("graph", g), ("resumed", r), ("noprobe", n)):
    diff = [(k, e[k], other.get(k)) for k in sorted(e) if e[k] != other.get(k)]
    print(f"{name} vs eager: {len(e) - len(diff)} of {len(e)} equal", diff[:5])
print("last:", {k: v for k, v in e.items() if k[0] == max(s for s, _ in e)})
rows = [json.loads(l) for l in (out / "graph" / "metrics.jsonl").read_text().splitlines() if l.strip()]
print("graph run: cuda_graph_replays at the end", max((r.get("cuda_graph_replays", 0) for r in rows), default=0),
      "; steps with stats", sorted(r["step"] for r in rows if any(k.startswith("stats/") for k in r)))
PY
