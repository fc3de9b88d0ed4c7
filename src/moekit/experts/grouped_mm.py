"""grouped_mm (level 5): torch._grouped_mm over the expert-sorted buffer, one launch per projection,
with no host synchronisation between routing and output (capturable in a CUDA graph)."""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from moekit.experts.registry import EXPERT_BACKENDS, sorted_rows_form
from moekit.permute import expert_layout, permute_tokens, unpermute_reduce
from moekit.validation import check_routing
from moekit.weights import MoEWeights


def grouped_mm_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 9:
            return False, "torch._grouped_mm needs compute capability 9.0 or newer"
        if dtype != torch.bfloat16:
            return False, "torch._grouped_mm on CUDA takes bf16"
        return True, ""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False, f"torch._grouped_mm on the CPU takes float32, float16 or bfloat16, not {dtype}"
    return True, ""


def sixteen_byte_rows(dtype: torch.dtype) -> int:
    """H and F must be multiples of this: torch._grouped_mm wants 16-byte aligned row strides."""
    return max(1, 16 // dtype.itemsize)


def check_alignment(x: torch.Tensor, weights: MoEWeights) -> None:
    multiple = sixteen_byte_rows(x.dtype)
    hidden, ffn = x.shape[1], weights.w_down.shape[2]
    if hidden % multiple or ffn % multiple:
        raise ValueError(
            f"grouped_mm needs hidden size and ffn size that are multiples of {multiple} for {x.dtype} "
            f"(16-byte rows), got H={hidden}, F={ffn}"
        )


def torch_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2F] (gate columns first) -> silu(gate) * up [N, F], in torch ops."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mlp(rows: torch.Tensor, expert_offsets: torch.Tensor, weights: MoEWeights, swiglu: Callable):
    """rows [M, H] grouped by expert, expert_offsets [E + 1] -> [M, H]: the two torch._grouped_mm launches
    with swiglu(gate_up [M, 2F]) -> [M, F] between them."""
    ends = expert_offsets[1:].to(torch.int32)
    gate_up = torch._grouped_mm(rows, weights.w_gate_up.transpose(1, 2), offs=ends)
    return torch._grouped_mm(swiglu(gate_up), weights.w_down.transpose(1, 2), offs=ends)


@sorted_rows_form("grouped_mm")
def grouped_mm_sorted_rows(rows: torch.Tensor, expert_offsets: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """rows [M, H] grouped by expert -> [M, H], SiLU * up in torch ops."""
    check_alignment(rows, weights)
    return grouped_mlp(rows, expert_offsets, weights, torch_swiglu)


def grouped_mm_pipeline(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: MoEWeights,
    *,
    permute: Callable,
    mlp: Callable,
    unpermute: Callable,
) -> torch.Tensor:
    """x [T, H] -> y [T, H] around the expert MLP on expert-sorted rows, with the stages passed in:
    permute(x, layout) -> rows [T*K, H], mlp(rows, expert_offsets [E + 1], weights) -> [T*K, H] (the two
    torch._grouped_mm launches, grouped_mlp), unpermute(out [T*K, H], layout, topk_weights) -> y [T, H]."""
    num_experts = weights.w_gate_up.shape[0]
    check_routing(topk_ids, topk_weights, num_experts)
    check_alignment(x, weights)
    layout = expert_layout(topk_ids, num_experts)
    out = mlp(permute(x, layout), layout.expert_offsets, weights)
    return unpermute(out, layout, topk_weights)


@EXPERT_BACKENDS.register("grouped_mm", supports=grouped_mm_support, size_multiple=sixteen_byte_rows, trains=True)
def grouped_mm(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights):
    """x [T, H] -> y [T, H]: permute, grouped gate+up, SiLU * up, grouped down, weighted unpermute."""
    mlp = partial(grouped_mlp, swiglu=torch_swiglu)
    return grouped_mm_pipeline(x, topk_ids, topk_weights, weights, permute=permute_tokens, mlp=mlp,
                               unpermute=unpermute_reduce)  # fmt: skip
