#!/usr/bin/env bash
# The reproduction study on one lent GPU (no network): wheels from .whl/, the Brown tarball from .cache/.
# Writes the runs under runs/repro*/ and a tarball of their metrics and configs to $OUT (or ./out).
OUT=${OUT:-$PWD/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export BITNET_CACHE=$PWD/.cache/bitnet_dist PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
(nvidia-smi --query-gpu=name --format=csv,noheader; date -u) > $OUT/device.txt
t0=$(date +%s)
timeout 330 python3 -m bitnet_dist.train -m experiment=repro logging.wandb=disabled > $OUT/repro.log 2>&1
echo "repro rc=$? $(( $(date +%s)-t0 ))s" >> $OUT/device.txt
timeout 200 python3 -m bitnet_dist.train -m experiment=repro_blocks logging.wandb=disabled > $OUT/blocks.log 2>&1
echo "blocks rc=$? $(( $(date +%s)-t0 ))s" >> $OUT/device.txt
find runs -name metrics.jsonl -o -name config.yaml | grep -v /hydra/ | tar czf $OUT/runs.tgz -T -
grep -v -i warn $OUT/repro.log | tail -15; cat $OUT/device.txt; find runs -name metrics.jsonl | wc -l
