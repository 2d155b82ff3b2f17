# Sourced by tools/gpu_round*.sh (from round 16 on): output folder, environment, the gpu_check command, the
# device's name in $OUT/device.txt, and (from round 18 on) the steps every round runs: common_step STEP, STEP one of
#   ktests (kernel GPU tests; KT_TIMEOUT: its limit, default 300 s), mtests (megatron GPU tests), dtests (DeepSpeed GPU tests),
#   e2e4 / e2eg4 / e2eg8: 1.3B, 4 x 2048: eager / CUDA graph / graph + FP8 backward (PRECS: the precisions).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G="python tools/megatron/gpu_check.py"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/device.txt

common_step() {
case "$1" in
ktests)
  timeout ${KT_TIMEOUT:-300} python -m pytest -q -p no:warnings -m gpu tests/test_kernels_gpu.py 2>&1 | tail -60 > $OUT/kernel_gpu_tests_full.txt; tail -5 $OUT/kernel_gpu_tests_full.txt | tee $OUT/kernel_gpu_tests.txt ;;
mtests)
  timeout 220 python -m pytest -q -p no:warnings -m gpu tests/test_megatron_gpu.py 2>&1 | tee $OUT/megatron_gpu_full.txt | tail -40 > $OUT/megatron_gpu_tests.txt; tail -3 $OUT/megatron_gpu_tests.txt ;;
dtests)
  timeout 200 python -m pytest -q -p no:warnings -m gpu tests/test_deepspeed_gpu.py 2>&1 | tail -40 > $OUT/deepspeed_gpu_tests.txt; tail -3 $OUT/deepspeed_gpu_tests.txt ;;
e2e4)  # 1.3B, 4 x 2048, eager
  timeout 280 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 2 --iters 5 \
    --out $OUT/e2e.jsonl 2>&1 | grep -E "^\[bench|Error" | cut -c1-300 ;;
e2eg4)  # 1.3B, 4 x 2048, CUDA graph
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph --out $OUT/e2e_graph.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
e2eg8)  # 1.3B, 4 x 2048, CUDA graph, FP8 backward
  timeout 300 $G bench --model 1.3B --precision ${PRECS:-bf16 v2_a4} --seq 2048 --mbs 4 --gbs 16 --vocab 32000 --warmup 4 --iters 5 \
    --cuda-graph --fp8-backward --out $OUT/e2e_graph_fp8.jsonl 2>&1 | grep -E "^\[bench|Error|error" | cut -c1-300 ;;
*)
  echo "unknown step $1" >&2; return 2 ;;
esac
}
