# Sourced by the tools/gpu-*.sh part scripts: $out (= $OUT) made, NVLink multicast off, moekit importable, and
# run LIMIT CMD... appending CMD's output and exit status to $out/summary.txt.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
run() { echo "### ${*:2}" >> "$out/summary.txt"; timeout "$1" "${@:2}" >> "$out/summary.txt" 2>&1; echo "rc=$?" >> "$out/summary.txt"; }
