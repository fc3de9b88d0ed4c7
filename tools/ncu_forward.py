"""One MoE FFN forward for Nsight Compute, after the autotuner has picked its configs: the forward runs
once unprofiled (compiles and tunes), then once inside the NVTX range "moekit-ncu", which ncu filters on:

  ncu --nvtx --nvtx-include "moekit-ncu/" --section SpeedOfLight --section MemoryWorkloadAnalysis \\
      python tools/ncu_forward.py --shape deepseek_v3 --tokens 8192 --backend triton_grouped
"""

import argparse

import torch

from moekit.bench.forward import SHAPES
from moekit.config import MoEConfig
from moekit.experts import EXPERT_BACKENDS
from moekit.problem import make_problem
from moekit.routing import route
from moekit.validation import trusted_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="deepseek_v3")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--backend", choices=EXPERT_BACKENDS.names(), default="triton_grouped")
    args = parser.parse_args()
    config = MoEConfig(**SHAPES[args.shape], router="fused_select", dtype=torch.bfloat16)
    problem = make_problem(config, args.tokens, device="cuda")
    routing = route(problem.router_logits(), config)
    backend = EXPERT_BACKENDS.get(args.backend).fn
    with trusted_values():
        backend(problem.x, routing.topk_ids, routing.topk_weights, problem.weights)  # compile and tune
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("moekit-ncu")
        backend(problem.x, routing.topk_ids, routing.topk_weights, problem.weights)
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
