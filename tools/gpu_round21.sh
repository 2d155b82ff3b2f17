#!/usr/bin/env bash
# Session 18 of 2026-11-25, one H100 (docs/benchmarks/raw/round21_2026-11-25/README.md). Start with the wheel line of
# ../shared/device/wheels.sh; carry .whl.
#   wbtests: the weight-batch GPU tests (kernels: bits against the per-weight path; megatron: the same curve with
#            BITNET_BATCHED_WEIGHT_QUANT=0 and 1) and the weight-quantization / layer GPU tests
#   e2eab: 1.3B, 4 x 2048, eager, one process: PRECS (default bf16, v2_a4 and v2_a4@nobatch, twice, in a mixed order),
#          host split, one step traced with CUDA activity only per engine (tarred)
#   e2enobatch: e2esplit (tools/gpu_round20.sh) with BITNET_BATCHED_WEIGHT_QUANT=0 (TAG _nobatch unless set)
#   plus the steps of tools/gpu_round20.sh, gpu_round19.sh and gpu_common.sh (wqhost now times the batch too)
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
for step in "$@"; do
t0=$(date +%s)
case "$step" in
wbtests)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py tests/test_megatron_gpu.py \
    -k "weight_batch or batched or ternary or weight_scales or hbit_linear" 2>&1 | tail -30 > $OUT/wb_gpu_tests${TAG:-}.txt
  tail -3 $OUT/wb_gpu_tests${TAG:-}.txt ;;
e2eab)
  timeout 420 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4 v2_a4@nobatch bf16 v2_a4@nobatch v2_a4} --seq 2048 --mbs 4 \
    --gbs 16 --vocab 32000 --warmup 2 --iters ${ITERS:-8} --host-split --profile-cuda $OUT/trace_ab${TAG:-} \
    --out $OUT/e2e_ab${TAG:-}.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-300
  (cd $OUT && tar cf trace_ab${TAG:-}.tar trace_ab${TAG:-} && rm -rf trace_ab${TAG:-}) ;;
e2enobatch)
  BITNET_BATCHED_WEIGHT_QUANT=0 TAG=${TAG:-_nobatch} bash "$(dirname "${BASH_SOURCE[0]}")/gpu_round20.sh" e2esplit ;;
*)
  bash "$(dirname "${BASH_SOURCE[0]}")/gpu_round20.sh" "$step" ;;
esac
echo "[round21] $step: $(( $(date +%s) - t0 )) s" | tee -a $OUT/times.txt
done
