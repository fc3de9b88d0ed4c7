"""The training step of triton_grouped taken apart on the GPU: each grouped GEMM of its forward and backward timed
alone (triton.testing.do_bench, median) beside the torch._grouped_mm call that computes the same product (what the
torchtitan-style peer runs), with TFLOP/s; says which piece a slow step loses its time in.

  python tools/backward_pieces.py --shapes mixtral,deepseek_v3 --tokens 4096,8192 [--json PATH]
"""

import argparse
import json

import torch
import triton

from moekit.bench.forward import SHAPES
from moekit.config import MoEConfig
from moekit.kernels.grouped_gemm import grouped_gemm, grouped_gemm_swiglu_backward
from moekit.kernels.grouped_weight_grad import grouped_weight_grad
from moekit.permute import expert_layout
from moekit.problem import make_problem
from moekit.routing import route


def pieces(shape: str, tokens: int, device: str = "cuda") -> list[dict]:
    config = MoEConfig(**SHAPES[shape], router="topk_softmax", dtype=torch.bfloat16)
    problem = make_problem(config, tokens, seed=0, device=device)
    routing = route(problem.router_logits(), config)
    layout = expert_layout(routing.topk_ids, config.num_experts)
    offsets = layout.expert_offsets
    ends = offsets[1:].to(torch.int32)
    rows = problem.x.index_select(0, layout.sorted_assignments // config.top_k)
    w_gu, w_d = problem.weights.w_gate_up, problem.weights.w_down
    M, H, F = rows.shape[0], config.hidden_size, config.ffn_size
    scale = torch.rand(M, device=device)
    gate_up = torch.empty(M, 2 * F, dtype=rows.dtype, device=device)
    act = grouped_gemm(rows, w_gu, offsets, swiglu=True, gate_up_out=gate_up)
    d_out = torch.randn(M, H, dtype=rows.dtype, device=device)
    d_gate_up, scaled_act, _ = grouped_gemm_swiglu_backward(d_out, w_d, offsets, gate_up, scale)
    d_rows = torch.empty_like(rows)
    gm = torch._grouped_mm
    cases = {
        # name: (FLOPs, moekit's Triton call, the torch._grouped_mm call of the same product)
        "fwd gate_up (+SwiGLU)": (2 * M * 2 * F * H, lambda: grouped_gemm(rows, w_gu, offsets, swiglu=True,
                                  gate_up_out=gate_up), lambda: gm(rows, w_gu.transpose(1, 2), offs=ends)),
        "fwd down": (2 * M * H * F, lambda: grouped_gemm(act, w_d, offsets, row_scale=scale),
                     lambda: gm(act, w_d.transpose(1, 2), offs=ends)),
        "bwd d_act (+SwiGLU bwd)": (2 * M * F * H, lambda: grouped_gemm_swiglu_backward(d_out, w_d, offsets, gate_up,
                                    scale), lambda: gm(d_out, w_d, offs=ends)),
        "bwd d_rows": (2 * M * H * 2 * F, lambda: grouped_gemm(d_gate_up, w_gu.transpose(1, 2), offsets, out=d_rows),
                       lambda: gm(d_gate_up, w_gu, offs=ends)),
        "bwd dW_gate_up": (2 * M * 2 * F * H, lambda: grouped_weight_grad(d_gate_up, rows, offsets),
                           lambda: gm(d_gate_up.t(), rows, offs=ends)),
        "bwd dW_down": (2 * M * H * F, lambda: grouped_weight_grad(d_out, scaled_act, offsets),
                        lambda: gm(d_out.t(), scaled_act, offs=ends)),
    }  # fmt: skip
    results = []
    for name, (flops, ours, theirs) in cases.items():
        ours_ms, theirs_ms = (triton.testing.do_bench(fn, warmup=25, rep=100) for fn in (ours, theirs))
        r = dict(shape=shape, tokens=tokens, piece=name, triton_ms=ours_ms, grouped_mm_ms=theirs_ms)
        r |= dict(triton_tflops=flops / ours_ms / 1e9, grouped_mm_tflops=flops / theirs_ms / 1e9)
        results.append(r)
        print(f"{shape:12} T={tokens} {name:24} triton {ours_ms:7.3f} ms {r['triton_tflops']:5.0f} TFLOP/s | "
              f"_grouped_mm {theirs_ms:7.3f} ms {r['grouped_mm_tflops']:5.0f} TFLOP/s", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="mixtral,deepseek_v3")
    parser.add_argument("--tokens", default="8192", help="comma-separated T")
    parser.add_argument("--json")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    results = [r for shape in args.shapes.split(",") for t in tokens for r in pieces(shape, t)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
