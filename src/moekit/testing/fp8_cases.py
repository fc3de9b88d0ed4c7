"""FP8 test data: weights whose 128 x 128 blocks differ in magnitude, as trained weights' do, so that a scale read
from the wrong block moves a result far past e4m3's own error (on i.i.d. random weights every block's amax is
about the same, and such a bug would hide inside the tolerance)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from moekit.quantize import BLOCK_SIZE
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
