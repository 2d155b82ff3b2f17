#!/usr/bin/env bash
# On a 2+ GPU machine: the multi-GPU layouts (gpu_multi.sh), then the one-GPU resume check with the distributed
# optimizer and the 400M megatron-vs-DeepSpeed curves over 50 steps.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/curves
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash tools/megatron/gpu_multi.sh ${1:-300}
echo "== resume"
timeout 60 python tools/megatron/resume_diag.py 2>&1 | grep -E "^\[|Error" | tail -4
timeout 60 python -m pytest -q -p no:warnings -p no:logging tests/test_megatron_gpu.py -k resume 2>&1 | grep -v DEBUG | grep -E "assert|Error|passed|failed" | head -8
echo "== curves 400M"
C="--seq 256 --mbs 4 --gbs 8 --lr 1e-3 --vocab 1024 --steps 50"
for e in megatron deepspeed; do
  timeout 75 python tools/megatron/gpu_check.py curve --engine $e --models 400M $C --out /tmp/curves/${e}_{model}.json 2>&1 | grep -E "^\[|Error" | tail -2
done
python tools/megatron/gpu_check.py compare /tmp/curves/megatron_400M.json /tmp/curves/deepspeed_400M.json --out $OUT/compare.jsonl 2>&1 | tail -1
tar czf $OUT/curves400.tar.gz -C /tmp curves
