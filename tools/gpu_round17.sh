#!/usr/bin/env bash
# Session 14 of 2026-11-25, one H100 (docs/benchmarks/raw/round17_2026-11-25/README.md). Start with the wheel line of
# ../shared/device/wheels.sh; carry .whl.
#   ktests: the kernel GPU tests (tests/test_kernels_gpu.py, with the SwiGLU-input tests)
#   mtests: the megatron GPU tests (BitMLP in the model; CUDA-graph steps bit-identical to eager)
#   dtests: the DeepSpeed GPU tests
#   saved: tools/megatron/saved_memory.py, 1.3B one layer, 4 x 2048 and 1 x 2048: bytes kept for backward by module
#   ktests_swiglu: the kernel GPU tests of the SwiGLU kernels and the H-BitLinear Function only
#   probe: tools/kernels/swiglu_probe.py (SwiGLU + Wdown fused / unfused, A4 and A8)
#   e2eg8: 1.3B, 4 x 2048, CUDA graph, FP8 backward: bf16 and v2_a4
#   e2e4: 1.3B, 4 x 2048, eager: bf16, v2_a4 (fused SwiGLU) and v2_a4:unfused; e2eg4: the same with the CUDA graph
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
for step in "$@"; do
t0=$(date +%s)
case "$step" in
ktests)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -60 > $OUT/kernel_gpu_tests_full.txt; tail -5 $OUT/kernel_gpu_tests_full.txt | tee $OUT/kernel_gpu_tests.txt ;;
ktests_swiglu)
  timeout 300 python -m pytest -q -s -p no:warnings -m gpu tests/test_kernels_gpu.py -k "glu or swiglu or hbit_linear_gpu" 2>&1 | grep -E "swiglu|passed|failed|Error" | tail -20 | tee $OUT/kernel_gpu_tests_swiglu.txt ;;
probe)
  for b in 4 8; do timeout 200 python tools/kernels/swiglu_probe.py --bits $b --out $OUT/swiglu_probe_a$b.json 2>&1 | grep -v -i warn > $OUT/swiglu_probe_a$b.txt; grep "==" $OUT/swiglu_probe_a$b.txt; done ;;
mtests)
  timeout 220 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tee $OUT/megatron_gpu_full.txt | tail -40 > $OUT/megatron_gpu_tests.txt; tail -3 $OUT/megatron_gpu_tests.txt ;;
dtests)
  timeout 200 python -m pytest -q -p no:warnings -m gpu tests/test_deepspeed_gpu.py 2>&1 | tail -40 > $OUT/deepspeed_gpu_tests.txt; tail -3 $OUT/deepspeed_gpu_tests.txt ;;
saved)
  for mbs in 4 1; do
    timeout 200 python tools/megatron/saved_memory.py --model 1.3B --mbs $mbs --seq 2048 --out $OUT/saved_memory.jsonl 2>&1 \
      | grep -v -i warn | tail -16 | tee $OUT/saved_memory_mbs$mbs.md
  done ;;
e2e4)  # 1.3B, 4 x 2048, eager
  timeout 280 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4 v2_a4:unfused} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-300 ;;
e2eg4)  # 1.3B, 4 x 2048, CUDA graph
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4 v2_a4:unfused} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph --out $OUT/e2e_graph.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
e2eg8)  # 1.3B, 4 x 2048, CUDA graph, FP8 backward
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph --fp8-backward --out $OUT/e2e_graph_fp8.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
esac
echo "[round17] $step: $(( $(date +%s) - t0 )) s" | tee -a $OUT/times.txt
done
