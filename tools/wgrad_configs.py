"""Each autotune config of grouped_weight_grad timed alone (do_bench median) at the training shapes' two weight
gradients, beside torch._grouped_mm's: says which tile shapes win where, and whether the tuner's pick is the best.

  python tools/wgrad_configs.py --shapes deepseek_v3,qwen3 --tokens 4096 [--json PATH]
  python tools/wgrad_configs.py --shapes qwen3 --tokens 4096 --subset 0/4   (every 4th config from the first:
      parallel processes compile the configs into Triton's disk cache before a timed run)
"""

import argparse
import json

import torch
import triton

from moekit.bench.forward import SHAPES
from moekit.config import MoEConfig
from moekit.kernels import grouped_weight_grad as wgrad
from moekit.permute import expert_layout
from moekit.problem import make_problem
from moekit.routing import route


def bench(fn, *args, **kwargs) -> float:
    return triton.testing.do_bench(lambda: fn(*args, **kwargs), warmup=25, rep=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="mixtral,qwen3,deepseek_v3")
    parser.add_argument("--tokens", default="4096")
    parser.add_argument("--subset", default="0/1", help="i/n: every n-th config from the i-th")
    parser.add_argument("--json")
    args = parser.parse_args()
    kernel = wgrad._grouped_weight_grad_kernel
    first, step = map(int, args.subset.split("/"))
    configs = list(kernel.configs)[first::step]
    results = []
    for shape in args.shapes.split(","):
        for tokens in map(int, args.tokens.split(",")):
            config = MoEConfig(**SHAPES[shape], router="topk_softmax", dtype=torch.bfloat16)
            problem = make_problem(config, tokens, seed=0, device="cuda")
            offsets = expert_layout(route(problem.router_logits(), config).topk_ids, config.num_experts).expert_offsets
            ends = offsets[1:].to(torch.int32)
            M, H, F = tokens * config.top_k, config.hidden_size, config.ffn_size
            d_gate_up, rows, d_out, activation = (
                torch.randn(M, n, dtype=torch.bfloat16, device="cuda") for n in (2 * F, H, H, F)
            )
            for gemm, a, b in (("dW_gate_up", d_gate_up, rows), ("dW_down", d_out, activation)):
                flops = 2 * M * a.shape[1] * b.shape[1]
                torch_ms = bench(torch._grouped_mm, a.t(), b, offs=ends)
                for tile in configs:
                    kernel.configs = [tile]  # one config: the autotuner runs it untimed
                    kernel.cache.clear()
                    ms = bench(wgrad.grouped_weight_grad, a, b, offsets)
                    results.append(dict(shape=shape, tokens=tokens, gemm=gemm, config=str(tile), ms=ms,
                                        tflops=flops / ms / 1e9, grouped_mm_tflops=flops / torch_ms / 1e9))  # fmt: skip
                    print(f"{shape} T={tokens} {gemm} {tile}: {results[-1]['tflops']:.0f} TFLOP/s "
                          f"(torch._grouped_mm {results[-1]['grouped_mm_tflops']:.0f})", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
