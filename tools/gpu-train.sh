#!/usr/bin/env bash
# On the GPU machine: the training tests compiled, then `moekit bench train` (issue #23), into $OUT.
#   tools/gpu-train.sh [tests|bench]...   (default: both; TOKENS=4096,8192 picks the bench's token counts)
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
run() { echo "### ${*:2}" >> "$out/summary.txt"; timeout "$1" "${@:2}" >> "$out/summary.txt" 2>&1; echo "rc=$?" >> "$out/summary.txt"; }
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests bench)
for part in "${parts[@]}"; do
  case $part in
    tests) HYPOTHESIS_PROFILE=gpu run 240 python -m pytest -q -p no:cacheprovider -n 4 tests/unit/test_expert_gradients.py \
      tests/unit/test_router_gradients.py tests/unit/test_layer_training.py tests/unit/test_bench_train.py ;;
    bench) run 400 python -m moekit bench train --runs 10 --tokens-list "${TOKENS:-4096,8192,16384}" --quiet \
      --json "$out/train.json" ;;
  esac
done
