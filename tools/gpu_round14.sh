#!/usr/bin/env bash
# Session 11 of 2026-11-25, one H100: the GPU checks of what sessions 9-10 committed CPU-tested only
# (tools/gpu_next.sh): the megatron GPU tests with the NCCL group teardown test, the kernel GPU tests, the app
# check (eager / graph / resumed / unprobed), then the kernel benchmark again as a second sample on this host.
# Then a register cap for the 16384-feature forward (reglab: tools/kernels/reglab.py), the kernel tests and the
# benchmark with it.
# Start with the wheel line of ../shared/device/wheels.sh; carry .whl and .cache.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
for step in "$@"; do
t0=$(date +%s)
case "$step" in
mtests)
  timeout 220 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tee $OUT/megatron_gpu_full.txt | tail -40 > $OUT/megatron_gpu_tests.txt; tail -3 $OUT/megatron_gpu_tests.txt ;;
tests)
  timeout 240 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -5 | tee $OUT/kernel_gpu_tests.txt ;;
app)
  OUT=$OUT/app_check timeout 400 bash tools/megatron/graph_app_check.sh 2>&1 | tee $OUT/app_check.txt | tail -6 ;;
reglab)  # the register-cap sweep (run 1, before the cap) / its confirmation twice (after)
  timeout 200 python tools/kernels/reglab.py --set ${REGLAB_SET:-confirm} --out $OUT/reglab_${REGLAB_SET:-confirm}.jsonl > /dev/null
  timeout 200 python tools/kernels/reglab.py --set ${REGLAB_SET:-confirm} --out $OUT/reglab_${REGLAB_SET:-confirm}.jsonl > /dev/null
  python -c "import json,sys; [print(r['T'],r['D'],r['bits'],r['bm'],r['warps'],r['maxnreg'],r.get('regs'),r.get('spills'),r.get('code_mismatch'),round(r.get('pct_copy',0),1),r.get('error','')) for r in map(json.loads,open(sys.argv[1])) if r['kind']=='fwd']" $OUT/reglab_${REGLAB_SET:-confirm}.jsonl ;;
bench)
  timeout 480 python -m bitnet_dist.bench --out "$OUT/bench" 2>&1 | tail -4 ;;
esac
echo "[round14] $step: $(( $(date +%s) - t0 )) s" | tee -a $OUT/times.txt
done
