"""compiled (level 7b): torch.compile over the grouped_mm path, letting Inductor fuse the permutation,
activation and unpermute around the two grouped GEMMs."""

import functools

import torch

from moekit.experts.grouped_mm import grouped_mm, grouped_mm_support, sixteen_byte_rows
from moekit.experts.registry import EXPERT_BACKENDS
from moekit.weights import MoEWeights


@functools.cache
def _compiled_grouped_mm():
    # built on first use (importing dynamo is slow); the default dynamic=None compiles the first shape
    # statically, then once more with dynamic token counts
    return torch.compile(grouped_mm)


def compiled_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "compiled is checked on GPU: on the CPU every drawn shape recompiles (minutes per test)"
    return grouped_mm_support(device, dtype)


@EXPERT_BACKENDS.register("compiled", supports=compiled_support, size_multiple=sixteen_byte_rows)
def compiled(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H] through the compiled grouped_mm path (compiles once per shape)."""
    return _compiled_grouped_mm()(x, topk_ids, topk_weights, weights)
