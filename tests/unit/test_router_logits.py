"""Router logits are float32-accurate on every path, the split-bf16 tensor-core path on CUDA included.

Each test measures, in the same run, the path's error and the error of its twin one step weaker: the router
weight in two bf16 parts (16 significant bits) where the path keeps three (24, float32's), so a path that
drops precision fails rather than passing under a bound that admits it."""

from dataclasses import replace

import pytest
import torch

from moekit import MoEConfig, make_problem
from moekit.testing import relative_error
from moekit.weights import _bf16_parts, _mm_has_float32_out, router_logits

# The logits' relative error allowed, float32 accuracy over H = 1024 terms. It sits between what float32
# accumulation gives and the two-part twin (~2^-17 of each weight left out), both measured: on the CPU the
# float32 GEMM 2.4e-7..3.5e-7, the three-part split emulated with float32 accumulation 1.4e-7..3.7e-7, the twin
# 2.2e-6..2.9e-6; on nvidia-h200 (tensor-core float32 accumulation) the split 1.11e-6..1.20e-6 and the twin
# 2.75e-6..2.84e-6 at T = 1, 333, 4096. 4e-6, the bound before, admitted the twin.
FLOAT32_ACCURACY = 1.8e-6


def _problem(device: str, dtype: torch.dtype, tokens: int):
    """(x [T, 1024], the weights, the float64 logits), router weights spread over a few binades."""
    config = MoEConfig(hidden_size=1024, ffn_size=64, num_experts=96, top_k=4, dtype=dtype)
    problem = make_problem(config, tokens, seed=5, device=device)
    w = problem.weights.router_weight
    spread = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)).exp().to(w.device)
    w.mul_(spread)  # magnitudes spread over a few binades, as trained weights are
    return problem.x, problem.weights, problem.x.double() @ w.double().T


def _summed_parts(x: torch.Tensor, parts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """x @ parts.T with float32 accumulation, the partial logits of each part summed: torch.mm's bf16 GEMM
    with float32 output on CUDA, a float32 GEMM of the same values elsewhere (bf16 x bf16 products are exact
    in float32, so the two differ only in the order of the float32 additions)."""
    if x.is_cuda and x.dtype == torch.bfloat16:
        logits = torch.mm(x, parts.T, out_dtype=torch.float32)
    else:
        logits = x.float() @ parts.float().T
    return logits.view(x.shape[0], parts.shape[0] // num_experts, num_experts).sum(dim=1)


def _two_part_twin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The weaker twin: the router weight in two bf16 parts, hi + mid (16 significant bits)."""
    hi = w.to(torch.bfloat16)
    return _summed_parts(x, torch.cat([hi, (w - hi.float()).to(torch.bfloat16)]), w.shape[0])


def _assert_between(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, expected: torch.Tensor, what: str):
    assert got.dtype == torch.float32 and got.shape == expected.shape
    error, twin_error = relative_error(got, expected), relative_error(_two_part_twin(x, w), expected)
    assert error < FLOAT32_ACCURACY < twin_error, (
        f"{what}: error {error:.2e}, two-part twin {twin_error:.2e}; FLOAT32_ACCURACY {FLOAT32_ACCURACY:.0e} "
        "is to lie between"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_logits_are_float32_accurate(dtype):
    x, weights, expected = _problem("cpu", dtype, 77)
    _assert_between(router_logits(x, weights), x, weights.router_weight, expected, f"CPU {dtype} logits")


def test_split_bf16_parts_are_float32_accurate():
    """The CUDA path's split (_bf16_parts) on the CPU, its GEMM emulated with float32 accumulation: three parts
    hold the weight to float32 accuracy, and a split that keeps two fails here, not only on a GPU."""
    x, weights, expected = _problem("cpu", torch.bfloat16, 77)
    w = weights.router_weight
    parts = _bf16_parts(w)
    assert parts.dtype == torch.bfloat16 and parts.shape == (3 * w.shape[0], w.shape[1])
    _assert_between(_summed_parts(x, parts, w.shape[0]), x, w, expected, "split-bf16 logits, CPU-emulated")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(96, 1024), (7, 333), (256, 7168), (0, 16)], ids=str)
def test_cuda_split_is_the_torch_split_bit_for_bit(shape):
    """The one-launch Triton split on CUDA gives torch's parts exactly, over six binades of weights with zeros,
    float32 subnormals (the lo part underflows bf16's range there too) and odd sizes."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
    if w.numel():
        w.view(-1)[::7] = 0.0
        w.view(-1)[1::11] = 1e-40
    assert torch.equal(_bf16_parts(w.cuda()).cpu(), _bf16_parts(w))  # the CPU split is torch's ops


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 333, 4096])
def test_cuda_bf16_logits_are_float32_accurate(tokens):
    """router_logits' tensor-core path against float64, and its two-part twin on the same GPU: the bound
    (set from the CPU emulation) is to lie between the two as measured there."""
    assert _mm_has_float32_out(torch.cuda.current_device()), "this torch has no torch.mm(out_dtype=float32)"
    x, weights, expected = _problem("cuda", torch.bfloat16, tokens)
    _assert_between(router_logits(x, weights), x, weights.router_weight, expected, f"CUDA bf16 logits, T={tokens}")


@pytest.mark.gpu
def test_cuda_bf16_logits_differentiate():
    """The tensor-core path's gradients (torch.mm's float32-out form has no derivative; router_logits gives
    one) against float64 autograd of the same values: dx in bf16, the router weight's in float32."""
    from moekit.testing.numerics import assert_close_to_reference, gradient_tolerance

    x, weights, _ = _problem("cuda", torch.bfloat16, 333)
    x, w = x.clone().requires_grad_(), weights.router_weight.clone().requires_grad_()
    d_logits = torch.randn(x.shape[0], w.shape[0], device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    router_logits(x, replace(weights, router_weight=w)).backward(d_logits)
    ref = [t.detach().double().requires_grad_() for t in (x, w)]
    (ref[0] @ ref[1].T).backward(d_logits.double())
    for name, got, expected in (("dx", x.grad, ref[0].grad), ("d router_weight", w.grad, ref[1].grad)):
        assert_close_to_reference(got, expected, got.dtype, name, gradient_tolerance(got.dtype))
