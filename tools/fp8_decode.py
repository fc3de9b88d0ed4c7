"""Where an FP8 decode step's time goes, on the GPU: each stage of the cuda_graph_fp8 forward (router logits,
select, layout and its torch form, token quantize, gate/up GEMM, activation quantize, down GEMM, unpermute) replayed
alone in a CUDA graph (triton.testing.do_bench_cudagraph, median) beside the whole forward's replay; then each of
grouped_gemm_fp8's autotune configs alone on the two GEMMs, with the GB/s of the weights they stream (the bound).

  python tools/fp8_decode.py --shapes mixtral,qwen3,deepseek_v3 --tokens 16,128 [--sweep] [--json PATH]
"""

import argparse
import json

import torch
import triton

from moekit.bench.forward import SHAPES
from moekit.config import MoEConfig
from moekit.experts.registry import FP8_EXPERT_BACKENDS
from moekit.kernels import grouped_gemm_fp8 as fp8_gemm
from moekit.kernels.permute import unpermute_reduce_triton
from moekit.kernels.quantize_rows import quantize_rows_triton
from moekit.permute import expert_layout, expert_layout_torch
from moekit.problem import make_problem
from moekit.quantize import quantize_weights
from moekit.routing import route
from moekit.validation import trusted_values


def replayed_ms(fn) -> float:
    fn()  # autotunes (a sync) before the capture
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def decode_step(shape: str, tokens: int, configs: list) -> list[dict]:
    config = MoEConfig(**SHAPES[shape], router="fused_select", dtype=torch.bfloat16)  # the bench's router
    problem = make_problem(config, tokens, seed=0, device="cuda")
    weights = quantize_weights(problem.weights, "row")
    logits = problem.router_logits()
    routing = route(logits, config, check_values=False)
    layout = expert_layout(routing.topk_ids, config.num_experts)
    offsets = layout.expert_offsets
    rows = quantize_rows_triton(problem.x, "row", layout)
    gu, dn = weights.w_gate_up, weights.w_down
    act, _ = fp8_gemm.grouped_gemm_fp8(rows.values, rows.scale, gu.values, gu.scale, offsets, swiglu=True)
    act_rows = quantize_rows_triton(act, "row")
    row_weights = torch.rand(rows.values.shape[0], device="cuda")
    out, _ = fp8_gemm.grouped_gemm_fp8(act_rows.values, act_rows.scale, dn.values, dn.scale, offsets,
                                       row_scale=row_weights)  # fmt: skip
    experts = FP8_EXPERT_BACKENDS.get("triton_grouped_fp8").fn

    def forward():
        r = route(problem.router_logits(), config, check_values=False)
        with trusted_values():
            return experts(problem.x, r.topk_ids, r.topk_weights, weights)

    active = int(torch.unique(routing.topk_ids).numel())
    gemm_bytes = {"gate_up": active * gu.values[0].numel(), "down": active * dn.values[0].numel()}
    gemms = {
        "gate_up": lambda: fp8_gemm.grouped_gemm_fp8(rows.values, rows.scale, gu.values, gu.scale, offsets,
                                                     swiglu=True),
        "down": lambda: fp8_gemm.grouped_gemm_fp8(act_rows.values, act_rows.scale, dn.values, dn.scale, offsets,
                                                  row_scale=row_weights),
    }  # fmt: skip
    stages = {
        "forward": forward,
        "router logits": problem.router_logits,
        "select": lambda: route(logits, config, check_values=False),
        "layout": lambda: expert_layout(routing.topk_ids, config.num_experts),
        "layout (torch)": lambda: expert_layout_torch(routing.topk_ids, config.num_experts),
        "quantize tokens": lambda: quantize_rows_triton(problem.x, "row", layout),
        **gemms,
        "quantize activation": lambda: quantize_rows_triton(act, "row"),
        "unpermute": lambda: unpermute_reduce_triton(out, layout, None),
    }
    results = []
    for name, fn in stages.items():
        ms = replayed_ms(fn)
        r = dict(shape=shape, tokens=tokens, stage=name, us=1e3 * ms)
        if name in gemm_bytes:
            r["weight_gbps"] = gemm_bytes[name] / ms / 1e6
        results.append(r)
        print(f"{shape:12} T={tokens:<4} {name:20} {r['us']:8.1f} us"
              + (f" {r['weight_gbps']:6.0f} GB/s" if "weight_gbps" in r else ""), flush=True)  # fmt: skip
    kernel = fp8_gemm._grouped_gemm_fp8_kernel
    tuned = kernel.configs
    for name, fn in gemms.items():
        for tile in configs:
            kernel.configs = [tile]  # one config: the autotuner runs it untimed
            kernel.cache.clear()
            ms = replayed_ms(fn)
            r = dict(shape=shape, tokens=tokens, stage=name, config=str(tile), us=1e3 * ms,
                     weight_gbps=gemm_bytes[name] / ms / 1e6)  # fmt: skip
            results.append(r)
            print(f"{shape:12} T={tokens:<4} {name:8} {tile}: {r['us']:7.1f} us {r['weight_gbps']:6.0f} GB/s",
                  flush=True)  # fmt: skip
    kernel.configs = tuned
    kernel.cache.clear()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mixtral,qwen3,deepseek_v3")
    parser.add_argument("--tokens", default="16,128")
    parser.add_argument("--sweep", action="store_true", help="also time each decode config alone")
    parser.add_argument("--json")
    args = parser.parse_args()
    decode_tiles = [c for c in fp8_gemm._grouped_gemm_fp8_kernel.configs if c.kwargs["BLOCK_M"] <= 32]
    configs = decode_tiles if args.sweep else []
    results = [
        r for shape in args.shapes.split(",") for t in map(int, args.tokens.split(",")) for r in
        decode_step(shape, t, configs)
    ]  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
