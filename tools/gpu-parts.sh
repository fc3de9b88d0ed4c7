# Sourced by the tools/gpu-*.sh part scripts: $out (= $OUT) made, NVLink multicast off, moekit importable, and
# run LIMIT CMD... appending CMD's output and exit status to $out/summary.txt in one piece once CMD ends (parts may
# run side by side).
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
run() {
  local log rc
  log=$(mktemp)
  # SIGINT first: pytest then still prints its summary (which tests failed) when the limit cuts a run short
  timeout -s INT -k 20 "$1" "${@:2}" > "$log" 2>&1; rc=$?
  { echo "### ${*:2}"; cat "$log"; echo "rc=$rc"; } >> "$out/summary.txt"
  rm -f "$log"
}
