#!/usr/bin/env bash
# Session 8 of 2026-11-24, one H100: GPU tests on the session-7 code; the full-iteration CUDA graph (engine.cuda_graph).
# Start with the wheel line.
#   tests / mtests: kernel and megatron GPU tests;  bench: the kernel benchmark (docs/benchmarks/kernels.{json,md})
#   e2e / e2eg: end-to-end 1.3B at 2 x 2048 and 4 x 2048 tokens per micro-batch, eager / with the CUDA graph
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt
for step in "$@"; do
case "$step" in
tests)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -3 | tee $OUT/kernel_gpu_tests.txt ;;
mtests)
  timeout 150 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tail -40 | tee $OUT/megatron_gpu_tests.txt ;;
overhead)
  timeout 150 python tools/kernels/overhead.py --out $OUT/overhead.json > $OUT/overhead.txt 2>&1; head -22 $OUT/overhead.txt ;;
bench)
  timeout 300 python -m bitnet_dist.bench --out $OUT/bench 2>&1 | grep -E "^copy|wrote|error|Error" | tail -8 ;;
e2e)
  for mbs in 2 4; do
  timeout 280 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs $mbs --gbs $((4 * mbs)) --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260; done ;;
gtest)
  timeout 200 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py -k cuda_graph 2>&1 | tee $OUT/graph_full.txt | tail -40 | tee $OUT/graph_gpu_tests.txt ;;
e2eg2|e2eg4|e2eg8)  # with the CUDA graph (engine warm-up 2 steps: bench warm-up 4 so that only replays are timed)
  mbs=${step#e2eg}; extra=""; if [ "$mbs" = 8 ]; then mbs=4; extra="--fp8-backward"; fi
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a8 v2_a4} --seq 2048 --mbs $mbs --gbs $((4 * mbs)) --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph $extra --out $OUT/e2e_graph.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
repeat)  # run-to-run determinism: eager x2, graph x3 in one process (tiny model)
  timeout 200 python tools/megatron/graph_probe.py v2_a8 repeat 2>&1 | grep "graph_probe\]\|Error" | tee $OUT/repeat_v2_a8.txt ;;
esac
done
