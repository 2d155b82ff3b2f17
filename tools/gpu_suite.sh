#!/usr/bin/env bash
# The GPU suite: install the package, run every GPU test (pytest -m gpu: kernels, megatron engine, DeepSpeed
# engine) and the kernel benchmark (python -m bitnet_dist.bench), writing logs and summaries to $OUT; the
# end-to-end benchmark against the peers (python -m bitnet_dist.bench_e2e) and the FP8-backward loss study
# (tools/fp8_loss_study.py) on request.
#
#   tools/gpu_suite.sh [STEP ...]        STEP: install, tests, bench, e2e, fp8 (default: install tests bench, in order)
#   tools/gpu_suite.sh --help
#
# Run it from the repository root on a machine with a CUDA GPU and the dependencies installed (torch, Triton,
# megatron-core, DeepSpeed). The install step installs bitnet-dist itself, editable and without dependencies
# (pip install --no-deps --no-build-isolation -e .), so bitnet_dist.kernels and bitnet_dist.conf resolve through
# the package as in a wheel install.
#
#   OUT            folder for logs and summaries (default: ./gpu_suite_out); summary.txt lists each step
#   TESTS_TIMEOUT  seconds for the GPU tests (default 1200)
#   TESTS_ARGS     what pytest runs (default: tests): files in the order to run them, -k, --timeout, ...
#   BENCH_ARGS     extra arguments for bitnet_dist.bench (default: none; the benchmark's defaults)
#   E2E_ARGS       arguments for bitnet_dist.bench_e2e (default: none; its defaults: 1.3B and 400M, every row)
#   FP8_ARGS       arguments for tools/fp8_loss_study.py run (default: --model 25M --steps 2000 --seeds 1 2). The
#                  study trains on the Brown corpus: a machine without network needs the corpus cache copied
#                  from one that has it (data.cache_dir / $BITNET_CACHE, docs/data.md)
#   FP8_BACKGROUND 1: the fp8 step starts in the background and the suite waits for it after its last step
#                  (its small runs share the GPU with the tests; not with bench or e2e, which time the GPU)
set -uo pipefail
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/gpu_suite_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
# NVLink multicast (NVLS) off: not available on every host, and the NCCL paths here do not need it
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(install tests bench)
for step in "${steps[@]}"; do
  case "$step" in install|tests|bench|e2e|fp8) ;; *) echo "gpu_suite.sh: unknown step '$step' (install, tests, bench, e2e or fp8; --help)" >&2; exit 2 ;; esac
done
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/device.txt"
python -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
  > "$OUT/versions.txt" 2>&1
status=0
summary() { echo "$1" | tee -a "$OUT/summary.txt"; }
for step in "${steps[@]}"; do
  t0=$(date +%s)
  case "$step" in
    install)
      # --no-build-isolation: the build uses this environment's setuptools (no index needed)
      if ! python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)" 2>/dev/null; then
        echo "gpu_suite.sh: the install step needs setuptools >= 68 in this environment (pip install" \
          "'setuptools>=68', or carry its wheel)" | tee "$OUT/install.log" >&2
        rc=1
      else
        python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
        rc=$?
      fi
      [ $rc -eq 0 ] && python -c "import bitnet_dist.kernels, bitnet_dist.conf" >> "$OUT/install.log" 2>&1
      rc=$(( rc || $? )) ;;
    tests)
      # tests/kernels/test_kernels.py is the CPU suite of the kernels: importing it turns on Triton's interpreter
      # for the whole process, so the GPU run leaves it out (pytest -m gpu would deselect its tests anyway)
      # shellcheck disable=SC2086
      timeout "${TESTS_TIMEOUT:-1200}" python -m pytest -q -p no:cacheprovider -m gpu \
        --ignore=tests/kernels/test_kernels.py ${TESTS_ARGS:-tests} > "$OUT/gpu_tests.log" 2>&1
      rc=$?
      tail -5 "$OUT/gpu_tests.log" > "$OUT/gpu_tests_summary.txt" ;;
    bench)
      # shellcheck disable=SC2086
      python -m bitnet_dist.bench --out "$OUT/bench" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
      rc=$? ;;
    e2e)
      # shellcheck disable=SC2086
      python -m bitnet_dist.bench_e2e --out "$OUT/e2e" ${E2E_ARGS:-} > "$OUT/e2e.log" 2>&1
      rc=$? ;;
    fp8)
      fp8_args="${FP8_ARGS:---model 25M --steps 2000 --seeds 1 2}"
      meta="$(head -1 "$OUT/device.txt" 2>/dev/null | cut -d, -f1), $(date -u +%F); python tools/fp8_loss_study.py run DIR $fp8_args"
      # shellcheck disable=SC2086
      if [ "${FP8_BACKGROUND:-0}" = 1 ]; then
        python tools/fp8_loss_study.py run "$OUT/fp8" $fp8_args --meta "$meta" > "$OUT/fp8.log" 2>&1 &
        fp8_pid=$!
        summary "fp8: started in the background"
        continue
      fi
      # shellcheck disable=SC2086
      python tools/fp8_loss_study.py run "$OUT/fp8" $fp8_args --meta "$meta" > "$OUT/fp8.log" 2>&1
      rc=$? ;;
  esac
  summary "$step: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc, see $OUT)") in $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || status=1
done
if [ -n "${fp8_pid:-}" ]; then
  t0=$(date +%s)
  wait "$fp8_pid"
  rc=$?
  summary "fp8 (background): $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc, see $OUT/fp8.log)"), waited $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || status=1
fi
exit $status
