"""Router logits are float32-accurate on every path, the split-bf16 tensor-core path on CUDA included."""

import pytest
import torch

from moekit import MoEConfig, make_problem
from moekit.testing import relative_error
from moekit.weights import _mm_has_float32_out, router_logits

# what float32 accumulation over H = 1024 terms allows (~sqrt(H) * 2^-24 and change); bf16 logits miss it 1000x
FLOAT32_ACCURACY = 4e-6


def _logits_error(device: str, dtype: torch.dtype, tokens: int) -> float:
    config = MoEConfig(hidden_size=1024, ffn_size=64, num_experts=96, top_k=4, dtype=dtype)
    problem = make_problem(config, tokens, seed=5, device=device)
    w = problem.weights.router_weight
    w.mul_(torch.exp(torch.randn_like(w)))  # magnitudes spread over a few binades, as trained weights are
    expected = problem.x.double() @ w.double().T
    got = router_logits(problem.x, problem.weights)
    assert got.dtype == torch.float32 and got.shape == (tokens, 96)
    return relative_error(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_logits_are_float32_accurate(dtype):
    assert _logits_error("cpu", dtype, 77) < FLOAT32_ACCURACY


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 333, 4096])
def test_cuda_bf16_logits_are_float32_accurate(tokens):
    assert _mm_has_float32_out(torch.cuda.current_device()), "this torch has no torch.mm(out_dtype=float32)"
    assert _logits_error("cuda", torch.bfloat16, tokens) < FLOAT32_ACCURACY
