#!/usr/bin/env bash
# Everything issues #8 and #10 measure on a multi-GPU machine, in three device calls of under 10 minutes
# (a layer step takes 1-2 minutes on a fresh machine: weights, autotuning):
#   tools/device-run.sh bash tools/ep-gpu-session.sh tests    (1)
#   tools/device-run.sh bash tools/ep-gpu-session.sh bench    (2, and the 128-token layer)
#   tools/device-run.sh bash tools/ep-gpu-session.sh layers   (3)
# Logs, JSON and PNGs go under $OUT (or ./ep-session).
# 1. nox -s gpu: unit + distributed tests on every GPU, then the perf cases (the multi-GPU ones included),
#    gated against baselines/<kind>.json; copy $OUT/perf/gpu.json there when the kind has none yet.
# 2. moekit bench a2a: normal and low-latency for every path, then the batch / local-experts / top-k sweeps.
# 3. moekit layer, DeepSeek-V3 at 4096 tokens per rank on nccl and nvshmem_triton, overlapped two ways
#    without token chunks (each chunk would read every local expert's weights again: +2.7 ms per chunk at
#    11.3 GB per rank, about T_comm itself): the shared experts beside both exchanges, and that plus the
#    own rank's tokens first; then symmetric_triton with and without the fused combine; the 128-token layer
#    as CUDA-graph replays (nvshmem_triton_graph, symmetric_triton_graph with the fused combine) runs in part 2.
# Each step has its own time limit, so one slow step cannot take the others' figures with it.
set -uo pipefail
out=${OUT:-ep-session}
mkdir -p "$out"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
ds="--hidden 7168 --ffn 2048 --experts 256 --topk 8 --shared 1 --router grouped_topk --n-group 8 --topk-group 4"
step() {  # step NAME SECONDS COMMAND...: run it, log it, print its last lines
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name: rc=$? ($(date +%T))"
  grep -vE "Warning|warn\(" "$out/$name.txt" | tail -n 14
}
mode=${1:-bench}  # the loops below reuse the positional parameters
echo "machine: $gpus GPU(s), $mode"
if [ "$mode" = tests ]; then
  step gpu 560 nox -s gpu
  cp -r .perf "$out/perf" 2>/dev/null
  exit 0
fi
if [ "$mode" = layers ]; then
  for dispatcher in nccl nvshmem_triton; do
    for overlap in "shared --chunks 1" "ownfirst --chunks 1 --own-first"; do
      set -- $overlap
      name=layer-4096-$dispatcher-$1
      shift
      step "$name" 140 python -m moekit layer --gpus "$gpus" --check --batch 1 --seq 4096 $ds "$@" \
        --dispatcher "$dispatcher" --experts-backend grouped_mm_fused --runs 5 --json "$out/$name.json"
    done
  done
  for fused in "" "--fused-combine"; do  # the FlashMoE layout, its down projection fused into the combine or not
    name=layer-4096-symmetric_triton${fused:+-fused}
    step "$name" 140 python -m moekit layer --gpus "$gpus" --check --batch 1 --seq 4096 $ds --chunks 1 \
      --dispatcher symmetric_triton --capacity-factor 16 --experts-backend triton_grouped $fused --runs 5 \
      --json "$out/$name.json"
  done
  exit 0
fi
step a2a 90 python -m moekit bench a2a --gpus "$gpus" --json "$out/a2a.json"
for sweep in "batch 32,128,512,2048" "local-experts 8,16,64,128" "topk 1,2,4,8"; do
  set -- $sweep
  step "a2a-$1" 60 python -m moekit bench a2a --gpus "$gpus" --config low-latency --sweep "$1" --values "$2" \
    --runs 5 --paths nccl,nvshmem_triton_graph,symm_mem,padded_triton --json "$out/a2a-$1.json" --plot "$out/a2a-$1.png"
done
step layer-128-graph 120 python -m moekit layer --gpus "$gpus" --check --batch 1 --seq 128 $ds \
  --dispatcher nvshmem_triton_graph --experts-backend triton_grouped --runs 10 --json "$out/layer-128-graph.json"
step layer-128-symmetric-graph 120 python -m moekit layer --gpus "$gpus" --check --batch 1 --seq 128 $ds \
  --dispatcher symmetric_triton_graph --capacity-factor 8 --fused-combine --experts-backend triton_grouped \
  --runs 10 --json "$out/layer-128-symmetric-graph.json"
