#!/usr/bin/env bash
# Session 16 of 2026-11-25, one H100 (docs/benchmarks/raw/round19_2026-11-25/README.md). Start with the wheel line of
# ../shared/device/wheels.sh; carry .whl.
#   hostbd: tools/kernels/host_breakdown.py (host microseconds per H-BitLinear call, by function)
#   launchcost: tools/kernels/launch_cost.py (host microseconds of one fused-forward launch, layer by layer)
#   e2e2: 1.3B, 2 x 2048, eager (NOPLANS=1: launch plans off; TAG: file suffix)
#   e2e4noplans: e2e4 with BITNET_LAUNCH_PLANS=0
#   bench: python -m bitnet_dist.bench --out $OUT/bench (the committed kernel benchmark)
#   ptests: the launch-plan and GLU GPU tests with BITNET_CHECK_LAUNCH_KEYS=1; ktestsck: all kernel GPU tests with it
#   overhead: tools/kernels/overhead.py (host microseconds per call; cProfile of A4)
#   plus the shared steps of tools/gpu_common.sh (ktests, mtests, dtests, e2e4, e2eg4, e2eg8)
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
for step in "$@"; do
t0=$(date +%s)
case "$step" in
hostbd)
  timeout 200 python tools/kernels/host_breakdown.py --out $OUT/host_breakdown${TAG:-}.json 2>&1 | grep -v -i warn | tail -150 ;;
launchcost)
  timeout 120 python tools/kernels/launch_cost.py --out $OUT/launch_cost${TAG:-}.json 2>&1 | grep -v -i warn | tail -40 ;;
e2e2)  # 1.3B, 2 x 2048 (the host-bound regime of r5-r15), eager; NOPLANS=1: BITNET_LAUNCH_PLANS=0
  BITNET_LAUNCH_PLANS=$([ "${NOPLANS:-0}" = 1 ] && echo 0 || echo 1) timeout 280 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} \
    --seq 2048 --mbs 2 --gbs 8 --vocab 32000 --warmup 2 --iters 5 --out $OUT/e2e_mbs2${TAG:-}.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-300 ;;
e2e4noplans)  # as e2e4 with the launch plans off (BITNET_LAUNCH_PLANS=0)
  BITNET_LAUNCH_PLANS=0 timeout 280 $G bench --model 1.3B --precision ${PRECS:-v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e_noplans.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-300 ;;
bench)  # python -m bitnet_dist.bench (docs/benchmarks/kernels.{json,md})
  timeout 540 python -m bitnet_dist.bench --out "$OUT/bench" 2>&1 | grep -v -i warn | tail -4 ;;
ptests)  # the launch-plan GPU test and the GLU ones, every keyed launch checked against the full key
  BITNET_CHECK_LAUNCH_KEYS=1 timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py -k "launch_plans or glu or int8_gemm or hbit_linear" 2>&1 | tail -30 | tee $OUT/kernel_gpu_tests_plans.txt ;;
ktestsck)  # all kernel GPU tests with BITNET_CHECK_LAUNCH_KEYS=1
  (export BITNET_CHECK_LAUNCH_KEYS=1 KT_TIMEOUT=${KT_TIMEOUT:-540}; common_step ktests) ;;
overhead)
  timeout 120 python tools/kernels/overhead.py --out $OUT/overhead${TAG:-}.txt > /dev/null 2>&1; head -20 $OUT/overhead${TAG:-}.txt ;;
*)
  common_step "$step" ;;
esac
echo "[round19] $step: $(( $(date +%s) - t0 )) s" | tee -a $OUT/times.txt
done
