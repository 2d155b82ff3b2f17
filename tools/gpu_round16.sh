#!/usr/bin/env bash
# Session 13 of 2026-11-25, one H100 (docs/benchmarks/raw/round16_2026-11-25/README.md). Start with the wheel line of
# ../shared/device/wheels.sh; carry .whl.
#   fp8lab: tools/kernels/fp8_block_lab.py (FP8 backward with 1 x 128 block scales against the row-wise form)
#   fp8prep: the same script --prep (the row-wise prep's amax / cast passes apart; acq_rel vs relaxed atomics)
#   xpose: tools/kernels/xpose_lab.py, which exists only at commit 2d4cb89 (the experiment, reverted)
#   smoke: the benchmark at 1024 tokens, fused + layer tables only (a quick check of the timing code)
#   tests / mtests / app / bench / e2eg8: as in tools/gpu_round15.sh (e2eg8: 1.3B, 4 x 2048, graph, FP8 backward)
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
for step in "$@"; do
t0=$(date +%s)
case "$step" in
fp8prep)  # the row-wise prep's two passes timed apart over tiles
  timeout 300 python tools/kernels/fp8_block_lab.py --prep --out $OUT/fp8_prep_lab.jsonl 2>&1 | grep -E "^\[lab|Error|error" | cut -c1-300 ;;
xpose)  # the forward's Hadamard lane stages through two 16 x 16 transposes vs shuffles (tools/kernels/xpose_lab.py)
  timeout 400 python tools/kernels/xpose_lab.py --out $OUT/xpose_lab.jsonl 2>&1 | grep -E "^\[xp|Error|error" | cut -c1-400 ;;
fp8lab)
  timeout 400 python tools/kernels/fp8_block_lab.py --out $OUT/fp8_block_lab.jsonl 2>&1 | grep -E "^\[lab|Error|error" | cut -c1-600 ;;
mtests)
  timeout 220 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tee $OUT/megatron_gpu_full.txt | tail -40 > $OUT/megatron_gpu_tests.txt; tail -3 $OUT/megatron_gpu_tests.txt ;;
app)
  OUT=$OUT/app_check timeout 400 bash tools/megatron/graph_app_check.sh 2>&1 | tee $OUT/app_check.txt | tail -6 ;;
tests)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -60 > $OUT/kernel_gpu_tests_full.txt; tail -5 $OUT/kernel_gpu_tests_full.txt | tee $OUT/kernel_gpu_tests.txt ;;
smoke)
  timeout 300 python -m bitnet_dist.bench --out "$OUT/smoke" --tokens 1024 --reps 6 --only fused layer 2>&1 | grep -E "^copy|wrote|error|Error" | tail -8 ;;
bench)
  timeout 480 python -m bitnet_dist.bench --out "$OUT/bench" 2>&1 | grep -E "^copy|wrote|error|Error" | tail -8 ;;
e2e4)  # 1.3B, 4 x 2048, eager
  timeout 280 $G bench --model 1.3B --precision bf16 v2_a8 v2_a4 --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-260 ;;
e2eg2|e2eg4)  # 1.3B, 2 / 4 x 2048, CUDA graph, bf16 backward
  mbs=${step#e2eg}
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a8 v2_a4} --seq 2048 --mbs $mbs --gbs $((4 * mbs)) --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph --out $OUT/e2e_graph.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
e2eg8)  # 1.3B, 4 x 2048, CUDA graph, FP8 backward
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a8 v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph --fp8-backward --out $OUT/e2e_graph.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
esac
echo "[round16] $step: $(( $(date +%s) - t0 )) s" | tee -a $OUT/times.txt
done
