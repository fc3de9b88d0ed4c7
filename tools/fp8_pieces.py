"""triton_grouped_fp8's two GEMMs taken apart on the GPU: each timed alone (triton.testing.do_bench, median) with
the copy-engine (tensor descriptor) loads and with pointer loads, beside torch._scaled_grouped_mm computing the
same product with rowwise scales (the peer), in TFLOP/s; and the down GEMM once more on rowwise activation scales,
which is what it costs without a scale change every 128 of K. Says where a slow FP8 forward loses its time.

  python tools/fp8_pieces.py --shapes mixtral,qwen3,deepseek_v3 --tokens 8192 [--json PATH]
"""

import argparse
import json
import os

import torch
import triton

from moekit.bench.forward import SHAPES
from moekit.config import MoEConfig
from moekit.kernels.grouped_gemm_fp8 import grouped_gemm_fp8
from moekit.kernels.quantize_rows import quantize_rows_triton
from moekit.permute import expert_layout
from moekit.problem import make_problem
from moekit.quantize import QuantizedRows, quantize_rows, quantize_weights
from moekit.routing import route


def timed(fn, tma: bool) -> float:
    os.environ["MOEKIT_TMA"] = "1" if tma else "0"
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def pieces(shape: str, tokens: int, scheme: str) -> list[dict]:
    config = MoEConfig(**SHAPES[shape], router="topk_softmax", dtype=torch.bfloat16)
    problem = make_problem(config, tokens, seed=0, device="cuda")
    layout = expert_layout(route(problem.router_logits(), config).topk_ids, config.num_experts)
    offsets, ends = layout.expert_offsets, layout.expert_offsets[1:].to(torch.int32)
    weights = quantize_weights(problem.weights, scheme)
    gu, dn = weights.w_gate_up, weights.w_down
    rows = quantize_rows_triton(problem.x, scheme, layout)
    act, act_scale = grouped_gemm_fp8(rows.values, rows.scale, gu.values, gu.scale, offsets, swiglu=True,
                                      quantize_out=True)  # fmt: skip
    act_rowwise = quantize_rows(QuantizedRows(act, act_scale, "block").dequantize(), "row")
    row_weights = torch.rand(rows.values.shape[0], device="cuda")
    M, H, F, E = rows.values.shape[0], config.hidden_size, config.ffn_size, config.num_experts
    cases = {  # name: (FLOPs, moekit's call, the peer's call or None)
        "gate_up (+SwiGLU, requant)": (
            2 * M * 2 * F * H,
            lambda: grouped_gemm_fp8(rows.values, rows.scale, gu.values, gu.scale, offsets, swiglu=True,
                                     quantize_out=True),
            lambda: torch._scaled_grouped_mm(rows.values, gu.values.transpose(1, 2), rows.scale.view(-1),
                                             gu.scale.view(E, -1), offs=ends, out_dtype=torch.bfloat16),
        ),
        "down (+router weight)": (
            2 * M * H * F,
            lambda: grouped_gemm_fp8(act, act_scale, dn.values, dn.scale, offsets, row_scale=row_weights),
            lambda: torch._scaled_grouped_mm(act_rowwise.values, dn.values.transpose(1, 2), act_rowwise.scale.view(-1),
                                             dn.scale.view(E, -1), offs=ends, out_dtype=torch.bfloat16),
        ),
        "down, rowwise activation": (
            2 * M * H * F,
            lambda: grouped_gemm_fp8(act_rowwise.values, act_rowwise.scale, dn.values, dn.scale, offsets,
                                     row_scale=row_weights),
            None,
        ),
    }  # fmt: skip
    results = []
    for name, (flops, ours, peer) in cases.items():
        r = dict(shape=shape, tokens=tokens, scheme=scheme, piece=name)
        r |= dict(tma_ms=timed(ours, True), pointers_ms=timed(ours, False))
        if peer is not None and scheme == "row":
            r["scaled_grouped_mm_ms"] = timed(peer, True)
        line = f"{shape:12} T={tokens:<5} {scheme:5} {name:28}"
        for key in ("tma_ms", "pointers_ms", "scaled_grouped_mm_ms"):
            if key in r:
                r[key.replace("_ms", "_tflops")] = flops / r[key] / 1e9
                line += f" | {key[:-3]} {r[key]:7.3f} ms {flops / r[key] / 1e9:5.0f} TFLOP/s"
        print(line, flush=True)
        results.append(r)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mixtral,qwen3,deepseek_v3")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--schemes", default="row,block")
    parser.add_argument("--json")
    args = parser.parse_args()
    schemes = args.schemes.split(",")
    results = [r for shape in args.shapes.split(",") for s in schemes for r in pieces(shape, args.tokens, s)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
