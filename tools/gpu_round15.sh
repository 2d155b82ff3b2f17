#!/usr/bin/env bash
# Session 12 of 2026-11-25, one H100: the kernel benchmark with its new breakdown section (each kernel of a
# layer step timed alone, and the speed-up bounds of bitnet_dist/bench_breakdown.py), and the end-to-end 1.3B
# throughput on the code with the forward's register caps (not re-measured since session 11's change).
# Start with the wheel line of ../shared/device/wheels.sh; carry .whl.
#   mtests / app: megatron GPU tests / tools/megatron/graph_app_check.sh; tests: kernel GPU tests; bench: python -m bitnet_dist.bench (docs/benchmarks/kernels.{json,md})
#   e2e: 1.3B at 2 x 2048 and 4 x 2048 tokens per micro-batch, eager; e2eg2 / e2eg4 / e2eg8: with the CUDA graph
#   (e2eg8 = 4 x 2048 with the FP8 backward); clock: the fused forward after idle and after GEMM load
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
for step in "$@"; do
t0=$(date +%s)
case "$step" in
mtests)
  timeout 220 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tee $OUT/megatron_gpu_full.txt | tail -40 > $OUT/megatron_gpu_tests.txt; tail -3 $OUT/megatron_gpu_tests.txt ;;
app)  # tiny v2_a8_to_a4 run: eager vs CUDA graph vs graph stopped and resumed vs graph without probes
  OUT=$OUT/app_check timeout 400 bash tools/megatron/graph_app_check.sh 2>&1 | tee $OUT/app_check.txt | tail -6 ;;
tests)  # kernel GPU tests (the warp-shuffle kernels now also without the Hadamard)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -60 > $OUT/kernel_gpu_tests_full.txt; tail -5 $OUT/kernel_gpu_tests_full.txt | tee $OUT/kernel_gpu_tests.txt ;;
bench)
  timeout 480 python -m bitnet_dist.bench --out "$OUT/bench" 2>&1 | grep -E "^copy|wrote|error|Error" | tail -8 ;;
e2e)
  for mbs in 2 4; do
  timeout 280 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs $mbs --gbs $((4 * mbs)) --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260; done ;;
clock)  # the fused forward after idle / after GEMM load, with clocks (tools/kernels/clock_probe.py)
  timeout 150 python tools/kernels/clock_probe.py --out $OUT/clock_probe.jsonl ;;
bprobe)  # the fused forward alone / inside the breakdown (tools/kernels/breakdown_probe.py)
  timeout 200 python tools/kernels/breakdown_probe.py 2>&1 | grep -E "probe|Error" | tee $OUT/breakdown_probe.txt ;;
abnohad)  # whole QKV / fc1 layer steps: warp-shuffle (new) vs chunked (old) kernels, alternating
  timeout 300 python tools/kernels/ab_nohad.py --out $OUT/ab_nohad.jsonl 2>&1 | grep -E "^\[ab\]|Error" | tee $OUT/ab_nohad.txt ;;
e2eg2|e2eg4|e2eg8)  # with the CUDA graph (engine warm-up 2 steps: bench warm-up 4 so that only replays are timed)
  mbs=${step#e2eg}; extra=""; if [ "$mbs" = 8 ]; then mbs=4; extra="--fp8-backward"; fi
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a8 v2_a4} --seq 2048 --mbs $mbs --gbs $((4 * mbs)) --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph $extra --out $OUT/e2e_graph.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
esac
echo "[round15] $step: $(( $(date +%s) - t0 )) s" | tee -a $OUT/times.txt
done
