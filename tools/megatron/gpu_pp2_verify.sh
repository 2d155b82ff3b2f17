#!/usr/bin/env bash
# After the interleaved-schedule p2p fix (batch_p2p_comm off at VP): PP2 x VP2 against TP1 on 2 GPUs, the
# checkpoint saved at PP2 x VP2 continued at TP1, and the one-GPU resume test.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/mc
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G=tools/megatron/gpu_check.py
C="curve --engine megatron --models small --dtype fp32 --kernels torch --steps 20 --seq 128 --mbs 2 --gbs 8 --lr 1e-3 --vocab 1024"
timeout 40 torchrun --standalone --nproc_per_node 2 tools/megatron/pp_probe.py --pp 2 --vp 2 2>&1 | grep -E "^\[pp|Error" | tee $OUT/pp_probe.txt
timeout 30 python $G $C --out /tmp/mc/tp1.json 2>&1 | grep -E "^\[|Error"
timeout 40 torchrun --standalone --nproc_per_node 2 $G $C --pp 2 --vp 2 --save-at 10 --save-dir /tmp/mc/ck_pp2vp2 --out /tmp/mc/pp2vp2.json 2>&1 | grep -E "^\[|Error" | tail -2
timeout 30 python $G $C --load /tmp/mc/ck_pp2vp2 --out /tmp/mc/pp2vp2_to_tp1.json 2>&1 | grep -E "^\[|Error" | tail -2
for f in pp2vp2 pp2vp2_to_tp1; do python $G compare /tmp/mc/$f.json /tmp/mc/tp1.json --out $OUT/multi_compare.jsonl | tail -1; done
tar czf $OUT/pp2_curves.tar.gz --exclude 'ck_*' -C /tmp mc
timeout 45 python -m pytest -q -p no:warnings -p no:logging tests/test_megatron_gpu.py -k resume 2>&1 | grep -E "^E |passed|failed" | head -6 | tee $OUT/resume.txt
