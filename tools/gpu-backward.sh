#!/usr/bin/env bash
# On the GPU machine: the backward kernels' tests compiled, then each grouped GEMM of the training step timed
# beside torch._grouped_mm (tools/backward_pieces.py), into $OUT.
#   tools/gpu-backward.sh [compile|tests|pieces]...   (default: all three; TOKENS=4096,8192 picks the token counts)
# compile: the pieces of each shape in parallel processes, so every autotune config compiles on all the host's
# cores into Triton's disk cache; the timed run then tunes alone on the GPU. The throwaway timings are discarded.
source "$(dirname "$0")/gpu-parts.sh"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(compile tests pieces)
tokens=${TOKENS:-4096,8192}
for part in "${parts[@]}"; do
  case $part in
    compile) for shape in mixtral qwen3 deepseek_v3; do
        timeout "${LIMIT:-240}" python tools/backward_pieces.py --shapes "$shape" --tokens "${tokens##*,}" > /dev/null 2>&1 &
      done; wait ;;
    tests) MOEKIT_GROUPED_GEMM_TUNE=0 HYPOTHESIS_PROFILE=gpu run "${LIMIT:-240}" python -m pytest -q -rf -p no:cacheprovider \
      -n 8 tests/unit/test_kernel_grouped_backward.py tests/unit/test_kernel_grouped_gemm.py \
      tests/unit/test_expert_gradients.py tests/unit/test_layer_training.py ;;
    pieces) run "${LIMIT:-300}" python tools/backward_pieces.py --shapes mixtral,qwen3,deepseek_v3 --tokens "$tokens" \
      --json "$out/backward-pieces.json" ;;
  esac
done
