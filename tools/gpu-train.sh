#!/usr/bin/env bash
# On the GPU machine: the training tests compiled, then `moekit bench train` (issue #23), into $OUT.
#   tools/gpu-train.sh [tests|bench]...   (default: both; TOKENS=4096,8192 picks the bench's token counts)
source "$(dirname "$0")/gpu-parts.sh"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests bench)
for part in "${parts[@]}"; do
  case $part in
    tests) MOEKIT_GROUPED_GEMM_TUNE=0 HYPOTHESIS_PROFILE=gpu run ${LIMIT:-240} python -m pytest -q -p no:cacheprovider -n 4 \
      tests/unit/test_kernel_grouped_backward.py tests/unit/test_kernel_grouped_gemm.py tests/unit/test_expert_gradients.py \
      tests/unit/test_router_gradients.py tests/unit/test_layer_training.py tests/unit/test_bench_train.py ;;
    bench) run ${LIMIT:-400} python -m moekit bench train --runs 10 --tokens-list "${TOKENS:-4096,8192,16384}" --quiet \
      --json "$out/train.json" ;;
  esac
done
