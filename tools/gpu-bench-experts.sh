#!/usr/bin/env bash
# On the GPU machine (through tools/device-run.sh): the expert-compute figures of issue #7, into $OUT.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
run() { echo "### $*" >> "$out/summary.txt"; timeout "$1" "${@:2}" >> "$out/summary.txt" 2>&1; echo "rc=$?" >> "$out/summary.txt"; }
run 120 python -m moekit bench router --tokens 4096 --experts 64 --hidden 2048 --router softmax_topk --router fused_select
run 120 python -m moekit bench router --tokens 4096 --experts 256 --hidden 7168 --router softmax_topk --router fused_select --json "$out/router.json"
run 200 python -m moekit bench experts --runs 10 --json "$out/experts.json" --plot "$out/experts.png"
run 150 python -m moekit bench journey --runs 5 --json "$out/journey.json" --plot "$out/journey.png"
run 100 python -m moekit bench experts --runs 10 --tokens-list 4096 --skew-experts 4 --skew-bias 2 --json "$out/experts-skewed.json"
