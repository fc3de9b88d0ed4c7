"""TOLERANCE, the dtype -> relative-error table, sits between each dtype's routed experts and the same
experts one format weaker, both measured in the same run: a bound above the weaker format would let a
backend that computes in it (TF32 for float32, bf16 for float16, FP8 operands for bf16) pass."""

from dataclasses import replace

import pytest
import torch

from moekit import EXPERT_BACKENDS, MoEConfig, make_problem, quantize_weights, route
from moekit.quantize import SCHEMES, QuantizedTensor
from moekit.reference import reference_experts, reference_experts_fp8
from moekit.testing import TOLERANCE, relative_error
from moekit.testing.fp8_cases import with_spread_blocks


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to TF32's 11 significant bits (float32's range), as a TF32 tensor-core GEMM reads it."""
    mantissa, exponent = torch.frexp(t.float())
    return torch.ldexp(torch.round(mantissa * 2.0**11) / 2.0**11, exponent).to(t.dtype)


# dtype -> (its weaker twin, what it is): the twin's operands and arithmetic, from the dtype's values
WEAKER = {
    torch.float64: ("float32", lambda t: t.float()),
    torch.float32: ("TF32 operands", _tf32),
    torch.float16: ("bfloat16", lambda t: t.bfloat16()),
    torch.bfloat16: ("FP8 e4m3 operands", lambda t: t.to(torch.float8_e4m3fn).bfloat16()),
}


@pytest.mark.parametrize("dtype", [d for d in TOLERANCE if d != torch.float8_e4m3fn], ids=str)
def test_tolerance_sits_between_the_dtype_and_its_weaker_twin(dtype):
    """The naive backend on the CPU (64 tokens, H 256, F 128, 8 experts, K 2) in dtype, then on the same
    values converted by WEAKER[dtype]: the first error is under TOLERANCE[dtype], the second over it."""
    config = MoEConfig(hidden_size=256, ffn_size=128, num_experts=8, top_k=2, dtype=dtype)
    problem = make_problem(config, 64, seed=0)
    routing = route(problem.router_logits(), config)
    experts = EXPERT_BACKENDS.get("naive").fn
    big = ("w_gate_up", "w_down")
    as64 = replace(problem.weights, **{k: getattr(problem.weights, k).double() for k in big})
    expected = reference_experts(problem.x.double(), routing.topk_ids, routing.topk_weights, as64)
    error = relative_error(experts(problem.x, routing.topk_ids, routing.topk_weights, problem.weights), expected)
    name, weaker = WEAKER[dtype]
    twin_weights = replace(problem.weights, **{k: weaker(getattr(problem.weights, k)) for k in big})
    twin = experts(weaker(problem.x), routing.topk_ids, routing.topk_weights, twin_weights)
    twin_error = relative_error(twin, expected)
    assert error < TOLERANCE[dtype] < twin_error, (
        f"{dtype} {error:.2e}, {name} twin {twin_error:.2e}: TOLERANCE {TOLERANCE[dtype]:.1e} is to lie between"
    )


def _neighbour_block_scales(q: QuantizedTensor) -> QuantizedTensor:
    """q with each block read with the next block's scale along K (the last with the first): a kernel's
    off-by-one in the scale index."""
    return QuantizedTensor(q.values, q.scale.roll(1, dims=2).contiguous(), q.scheme, q.block_size)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fp8_tolerance_sits_between_the_recipe_and_a_scale_from_the_wrong_block(scheme):
    """The FP8 recipe (reference_experts_fp8, H 256, F 320, blocks of spread magnitude) against the oracle on
    the original weights: under TOLERANCE[float8_e4m3fn]; the recipe with block scales read one block off along
    K: over it (row scales have one scale along K, so a wrong expert's scales stand in)."""
    config = MoEConfig(hidden_size=256, ffn_size=320, num_experts=4, top_k=2, dtype=torch.float32)
    problem = make_problem(config, 64, seed=0)
    weights = with_spread_blocks(problem.weights, seed=1)
    routing = route(problem.router_logits(), config)
    expected = reference_experts(problem.x, routing.topk_ids, routing.topk_weights, weights)
    q = quantize_weights(weights, scheme)
    error = relative_error(reference_experts_fp8(problem.x, routing.topk_ids, routing.topk_weights, q), expected)
    if scheme == "block":
        wrong = replace(q, w_gate_up=_neighbour_block_scales(q.w_gate_up), w_down=_neighbour_block_scales(q.w_down))
    else:
        roll = {k: QuantizedTensor(t.values, t.scale.roll(1, dims=0).contiguous(), scheme) for k, t in
                (("w_gate_up", q.w_gate_up), ("w_down", q.w_down))}  # fmt: skip
        wrong = replace(q, **roll)
    twin = reference_experts_fp8(problem.x, routing.topk_ids, routing.topk_weights, wrong)
    twin_error = relative_error(twin, expected)
    tolerance = TOLERANCE[torch.float8_e4m3fn]
    assert error < tolerance < twin_error, f"{scheme}: recipe {error:.2e}, wrong scales {twin_error:.2e}"
