#!/usr/bin/env bash
# On the GPU machine: the FP8 tests compiled, then the FP8 expert figures of issue #22, into $OUT.
#   tools/gpu-fp8.sh [tests|block|row|block@T,T|row@T,T]...   (default: all three; @ picks the token counts)
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
run() { echo "### ${*:2}" >> "$out/summary.txt"; timeout "$1" "${@:2}" >> "$out/summary.txt" 2>&1; echo "rc=$?" >> "$out/summary.txt"; }
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests block row)
for part in "${parts[@]}"; do
  tokens=${TOKENS:-16,128,4096,8192}
  [[ $part == *@* ]] && tokens=${part#*@} && part=${part%@*}
  case $part in
    tests) MOEKIT_GROUPED_GEMM_TUNE=0 HYPOTHESIS_PROFILE=gpu run 240 python -m pytest -q -p no:cacheprovider -n 4 \
      tests/unit/test_kernel_grouped_gemm_fp8.py tests/unit/test_experts_fp8.py tests/unit/test_layer_fp8.py \
      tests/unit/test_tolerance_table.py tests/unit/test_quantize.py -W ignore::RuntimeWarning ;;
    block|row) run 330 python -m moekit bench experts --dtype fp8 --quant "$part" --runs 10 \
      --tokens-list "$tokens" --quiet --json "$out/experts-fp8-$part.json" ;;
  esac
done
