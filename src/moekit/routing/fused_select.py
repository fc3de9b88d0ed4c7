"""fused_select: softmax_topk computed by one fused Triton kernel (moekit.kernels.fused_select)."""

from __future__ import annotations

import functools
import os

import torch

from moekit.registry import Support
from moekit.routing.registry import ROUTERS, Routing

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(device: torch.device, dtype: torch.dtype) -> Support:
    """CUDA, or the CPU under the Triton interpreter (TRITON_INTERPRET=1); float16/bfloat16/float32 logits."""
    if not _triton_available():
        return False, "triton is not installed"
    if dtype not in KERNEL_DTYPES:
        return False, f"fused_select takes float16, bfloat16 or float32 logits, not {dtype}"
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return True, ""
    return False, "fused_select is a Triton kernel: needs CUDA or TRITON_INTERPRET=1"


@ROUTERS.register("fused_select", supports=supports)
def fused_select(logits: torch.Tensor, config, correction_bias=None) -> Routing:
    """logits [T, E] -> Routing, as softmax_topk: the K most probable experts and their probabilities."""
    from moekit.kernels.fused_select import fused_select as kernel  # imports triton: only when it runs

    ids, weights = kernel(logits, config.top_k, config.renormalize)
    return Routing(ids, weights)
