"""FP8 test data and error bounds: weights whose 128 x 128 blocks differ in magnitude, as trained weights' do, so
that a scale read from the wrong block moves a result far past e4m3's own error (on i.i.d. random weights every
block's amax is about the same, and such a bug would hide inside the tolerance); and the error a kernel's
re-quantized activation may add by rounding to the neighbouring e4m3 value."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from moekit.quantize import BLOCK_SIZE, FP8, FP8_MAX, QuantizedMoEWeights, quantize_rows
from moekit.reference import fp8_recipe_activations, reference_experts_fp8
from moekit.testing.numerics import TOLERANCE, fp8_kernel_tolerance
from moekit.weights import MoEWeights


def spread_blocks(w: torch.Tensor, generator: torch.Generator, spread: float = 1.5) -> torch.Tensor:
    """w [E, N, K] (any device; a CPU generator) with each 128 x 128 block (partial ones at the edges) times
    exp(spread * N(0, 1))."""
    E, N, K = w.shape
    nb, kb = math.ceil(N / BLOCK_SIZE), math.ceil(K / BLOCK_SIZE)
    factor = torch.exp(spread * torch.randn(E, nb, kb, generator=generator))
    factor = factor.repeat_interleave(BLOCK_SIZE, 1)[:, :N].repeat_interleave(BLOCK_SIZE, 2)[:, :, :K]
    return (w.float() * factor.to(w.device)).to(w.dtype)


def with_spread_blocks(weights: MoEWeights, seed: int) -> MoEWeights:
    """weights with spread_blocks applied to the routed experts' w_gate_up and w_down."""
    g = torch.Generator().manual_seed(seed)
    return replace(
        weights,
        w_gate_up=spread_blocks(weights.w_gate_up, g),
        w_down=spread_blocks(weights.w_down, g),
    )


def activation_margin(device: torch.device, scheme: str, dtype: torch.dtype) -> float:
    """How far (relative) a kernel's SwiGLU activation may sit from the float64 one when it is quantized, in a
    layer of dtype: twice its accumulation error (float32 rounding in the interpreter, fp8_kernel_tolerance on the
    GPU's tensor cores), and under "row", where a pass of its own quantizes it, its rounding to dtype first."""
    on_gpu = device.type == "cuda"
    accumulation = fp8_kernel_tolerance(torch.float32, scheme == "row") if on_gpu else TOLERANCE[torch.float32]
    stored = torch.finfo(dtype).eps / 2 if scheme == "row" else 0.0
    return 2 * accumulation + stored


def requantization_flip_error(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: QuantizedMoEWeights,
    margin: float,
) -> float:
    """How far from the FP8 recipe (relative to its norm) a kernel may land only because its SwiGLU activation,
    off the float64 one by up to `margin` relative, rounds to a neighbouring e4m3 value when re-quantized.

    Every activation element within margin of a rounding boundary is taken to flip by the step to the value it
    would reach; their effects on y are summed as independent errors (root of the sum of squares). Zero for an
    exact kernel with margin 0; on Hopper's FP8 tensor cores the activation is off by its accumulation error
    (activation_margin), and one flipped element moves a whole token's output, so small problems see errors of a
    few percent.
    """
    block = weights.w_gate_up.block_size
    variance = torch.zeros(x.shape, dtype=torch.float64)
    y = reference_experts_fp8(x, topk_ids, topk_weights, weights)
    router_weights = topk_weights.double().cpu()
    for token_idx, slot, activation, w_down in fp8_recipe_activations(x, topk_ids, weights):
        q = quantize_rows(activation, weights.scheme, block)
        scale = q.element_scale().double()
        nearest = q.values.double()
        step = torch.zeros_like(activation)
        for factor in (1 - margin, 1 + margin):
            reached = (activation * factor / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).double()
            step = torch.maximum(step, (reached - nearest).abs() * scale)
        router_weight = router_weights[token_idx, slot, None]
        variance.index_add_(0, token_idx, (step**2 @ (w_down**2).T) * router_weight**2)
    norm = float(torch.linalg.vector_norm(y))
    return float(variance.sum().sqrt()) / norm if norm > 0 else 0.0
