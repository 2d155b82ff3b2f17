#!/usr/bin/env bash
# Session 15 of 2026-11-25, one H100 (docs/benchmarks/raw/round18_2026-11-25/README.md). Start with the wheel line of
# ../shared/device/wheels.sh; carry .whl.
#   ktests: the kernel GPU tests (tests/test_kernels_gpu.py); ktests_glu: only the SwiGLU / GLU-fold ones
#   glulab: tools/kernels/glu_lab.py (launch configurations of the GLU-folded kernels at 8192 / 16384 features)
#   mtests: the megatron GPU tests; dtests: the DeepSpeed GPU tests
#   probe: tools/kernels/swiglu_probe.py: SwiGLU + Wdown folded / composed / unfused, 1.3B A4 and A8, 7B A4
#   e2e4nofold / e2eg4nofold: v2_a4 with BITNET_GLU_FOLD=0 (the SwiGLU kernels composed, as in session 14)
#   prof4: e2e4 with a profiled step per precision: GPU idle gaps in the eager step (tools/megatron/trace_gaps.py)
#   overhead: host microseconds per H-BitLinear call (tools/kernels/overhead.py) with cProfile of A4 / A4 glu
#   e2e4 / e2eg4 / e2eg8: 1.3B, 4 x 2048: eager / CUDA graph / graph + FP8 backward (PRECS: the precisions)
. "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
for step in "$@"; do
t0=$(date +%s)
case "$step" in
ktests_glu)
  timeout 300 python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py -k "glu or swiglu" 2>&1 | tail -30 | tee $OUT/kernel_gpu_tests_glu.txt ;;
probe)
  for spec in "4 8192 2048 1.3B" "8 8192 2048 1.3B" "4 16384 4096 7B"; do
    set -- $spec
    timeout 200 python tools/kernels/swiglu_probe.py --bits $1 --ffn $2 --hidden $3 --out $OUT/swiglu_probe_$4_a$1.json 2>&1 \
      | grep -v -i warn > $OUT/swiglu_probe_$4_a$1.txt; echo "-- $spec"; grep "==" $OUT/swiglu_probe_$4_a$1.txt
  done ;;
glulab)
  timeout 300 python tools/kernels/glu_lab.py --bits ${BITS:-4} --out $OUT/glu_lab_a${BITS:-4}.json 2>&1 | grep -v -i warn | tee $OUT/glu_lab_a${BITS:-4}.txt ;;
e2e4nofold)  # as e2e4 with the SwiGLU not folded into the fused kernels (BITNET_GLU_FOLD=0: composed, as in session 14)
  BITNET_GLU_FOLD=0 timeout 280 $G bench --model 1.3B --precision ${PRECS:-v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e_nofold.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-300 ;;
e2eg4nofold)
  BITNET_GLU_FOLD=0 timeout 300 $G bench --model 1.3B --precision ${PRECS:-v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph --out $OUT/e2e_graph_nofold.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
prof4)  # 1.3B, 4 x 2048, eager, with one profiled step per precision (table + chrome trace; trace_gaps.py)
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 3 \
    --profile $OUT/prof --out $OUT/e2e_prof.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-300
  for f in $OUT/prof/*.trace.json.gz; do python tools/megatron/trace_gaps.py $f --top 12 > ${f%.trace.json.gz}.gaps.json; head -8 ${f%.trace.json.gz}.gaps.json; done ;;
overhead)  # host time per H-BitLinear call (tools/kernels/overhead.py), cProfile of A4 and of A4 with glu
  for c in hbit_a4_fwd_bwd hbit_a4_glu_fwd_bwd; do timeout 120 python tools/kernels/overhead.py --prof-case $c --out $OUT/overhead_$c.txt > /dev/null 2>&1; done
  head -16 $OUT/overhead_hbit_a4_fwd_bwd.txt ;;
*)
  common_step "$step" ;;
esac
echo "[round18] $step: $(( $(date +%s) - t0 )) s" | tee -a $OUT/times.txt
done
