#!/usr/bin/env bash
# On the GPU machine: the training tests compiled, then `moekit bench train` (issue #23), into $OUT.
#   tools/gpu-train.sh [compile|tests|bench|steps]...   (default: compile tests bench; TOKENS=4096,8192 picks the bench's
#   token counts, LIMIT the seconds each part may take)
# compile: one throwaway step per shape, the shapes in parallel processes, so the Triton kernels of every autotune
# config compile on all the host's cores into Triton's disk cache; the bench then tunes (alone on the GPU) without
# compiling. The throwaway timings, taken side by side, are discarded.
source "$(dirname "$0")/gpu-parts.sh"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(compile tests bench)
tokens=${TOKENS:-4096,8192,16384}
for part in "${parts[@]}"; do
  case $part in
    compile) for shape in mixtral qwen3 deepseek_v3; do
        run "${LIMIT:-240}" python -m moekit bench train --runs 1 --shapes "$shape" --tokens-list "${tokens##*,}" \
          --paths triton_grouped --quiet &
      done; wait ;;
    tests) MOEKIT_GROUPED_GEMM_TUNE=0 HYPOTHESIS_PROFILE=gpu run "${LIMIT:-240}" python -m pytest -q -rf -p no:cacheprovider \
      -n 4 tests/unit/test_kernel_grouped_backward.py tests/unit/test_kernel_grouped_gemm.py \
      tests/unit/test_expert_gradients.py tests/unit/test_router_gradients.py tests/unit/test_layer_training.py \
      tests/unit/test_bench_train.py tests/unit/test_timing.py tests/unit/test_profiling.py \
      tests/unit/test_cuda_graph_training.py tests/unit/test_cuda_graph.py ;;
    steps) run "${LIMIT:-120}" python tools/step_kernels.py --shape qwen3 --tokens 4096 \
      --paths grouped_mm_fused,triton_grouped,torchtitan_peer ;;
    bench) run "${LIMIT:-400}" python -m moekit bench train --runs 10 --tokens-list "$tokens" --quiet \
      --paths "${PATHS:-grouped_mm,grouped_mm_fused,triton_grouped,cuda_graph}" --stages "${STAGES:-experts,layer}" \
      --json "$out/train.json" ;;
  esac
done
