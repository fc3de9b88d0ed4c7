"""Where one training step's GPU time goes, per kernel: `moekit bench train`'s experts step of each path, warmed
up, then profiled over a few steps; per-step kernel times, their sum, and the step's wall time beside them (the
gap is launch overhead and idle GPU).

  python tools/step_kernels.py --shape qwen3 --tokens 4096 --paths grouped_mm_fused,triton_grouped [--steps 5]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moekit.bench.forward import SHAPES
from moekit.bench.profiling import top_kernels
from moekit.bench.train import train_step
from moekit.config import MoEConfig
from moekit.problem import make_problem


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--paths", default="grouped_mm_fused,triton_grouped")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda")
    config = MoEConfig(**SHAPES[args.shape], router="topk_softmax", dtype=torch.bfloat16)
    problem = make_problem(config, args.tokens, seed=0, device=device)
    for path in args.paths.split(","):
        step = train_step(problem, path).step
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end) / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        kernels = top_kernels(prof, device, limit=40)
        busy = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e3
        print(f"## {args.shape} T={args.tokens} {path}: step {wall:.3f} ms, kernels {busy / args.steps:.3f} ms/step")
        for k in kernels:
            print(f"  {k.total_ms / args.steps:8.3f} ms  x{k.calls // args.steps:<3} {k.name}")


if __name__ == "__main__":
    main()
