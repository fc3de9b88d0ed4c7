#!/usr/bin/env bash
# On the GPU machine: the FP8 tests compiled, then the FP8 expert figures of issue #22, into $OUT.
#   tools/gpu-fp8.sh [tests|block|row|block@T,T|row@T,T]...   (default: all three; @ picks the token counts)
source "$(dirname "$0")/gpu-parts.sh"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests block row)
for part in "${parts[@]}"; do
  tokens=${TOKENS:-16,128,4096,8192}
  [[ $part == *@* ]] && tokens=${part#*@} && part=${part%@*}
  case $part in
    tests) MOEKIT_GROUPED_GEMM_TUNE=0 HYPOTHESIS_PROFILE=gpu run ${LIMIT:-240} python -m pytest -q -p no:cacheprovider -n 4 \
      tests/unit/test_kernel_grouped_gemm_fp8.py tests/unit/test_experts_fp8.py tests/unit/test_layer_fp8.py \
      tests/unit/test_tolerance_table.py tests/unit/test_quantize.py tests/distributed/test_dispatch_fp8.py -W ignore::RuntimeWarning ;;
    block|row) run 330 python -m moekit bench experts --dtype fp8 --quant "$part" --runs 10 \
      --tokens-list "$tokens" --quiet --json "$out/experts-fp8-$part.json" ;;
  esac
done
