#!/usr/bin/env bash
# Session 17 of 2026-11-25, one H100 (docs/benchmarks/raw/round20_2026-11-25/README.md). Start with the wheel line of
# ../shared/device/wheels.sh; carry .whl.
#   e2esplit: 1.3B, 4 x 2048, eager (PRECS), with the host's queue / drain split of the timed steps, one more step with
#             the sync debug mode and one traced with CUDA activity only (GPU idle time by phase; gpu_check.py bench
#             --host-split --sync-debug --profile-cuda); the traces in one tar (the device returns few files)
#   e2egsplit: the same with the CUDA graph (host split only)
#   e2eorder: PRECS in one process, eager, host split (GCOFF=1: the cyclic GC off over the timed steps)
#   wqhost: tools/kernels/weight_quant_host.py (one step's weight quantization, three-kernel / composed)
#   wqtests: the weight-quantization and layer GPU tests
#   plus the steps of tools/gpu_round19.sh and tools/gpu_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
for step in "$@"; do
t0=$(date +%s)
case "$step" in
e2esplit)
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} --seq 2048 --mbs ${MBS:-4} --gbs $((4 * ${MBS:-4})) --vocab 32000 \
    --warmup 2 --iters 5 --host-split --sync-debug --profile-cuda $OUT/trace${TAG:-} --out $OUT/e2e_split${TAG:-}.jsonl 2>&1 \
    | grep -E "^\[bench|Error" | cut -c1-1500
  (cd $OUT && tar cf trace${TAG:-}.tar trace${TAG:-} && rm -rf trace${TAG:-}) ;;
e2egsplit)
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} --seq 2048 --mbs ${MBS:-4} --gbs $((4 * ${MBS:-4})) --vocab 32000 \
    --warmup 4 --iters 5 --cuda-graph --host-split --out $OUT/e2e_graph_split${TAG:-}.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-900 ;;
e2eorder)  # 1.3B, 4 x 2048, eager, PRECS in one process (GCOFF=1: --gc-off), host split
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --host-split $([ "${GCOFF:-0}" = 1 ] && echo --gc-off) --out $OUT/e2e_order${TAG:-}.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-600 ;;
wqhost)
  timeout 120 python tools/kernels/weight_quant_host.py --out $OUT/weight_quant_host${TAG:-}.json 2>&1 | grep -v -i warn | tail -8 ;;
wqtests)
  timeout 200 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py -k "ternary or weight_scales or hbit_linear" 2>&1 | tail -5 | tee $OUT/wq_gpu_tests${TAG:-}.txt ;;
*)
  bash "$(dirname "${BASH_SOURCE[0]}")/gpu_round19.sh" "$step" ;;
esac
echo "[round20] $step: $(( $(date +%s) - t0 )) s" | tee -a $OUT/times.txt
done
