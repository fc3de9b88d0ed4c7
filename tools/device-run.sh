#!/usr/bin/env bash
# On the GPU machine: install the carried wheels (.whl/, see ../shared/device/README.md), then run the
# given command with moekit importable and NVLink multicast off. Logs go to $OUT when it is set.
#   tools/device-run.sh nox -s gpu
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
"$@"
