"""The Triton permute, SwiGLU and unpermute under autograd, each backward built from the others' kernels:

  permute            rows[r(t, k)] = x[t]               dx[t] = sum_k d_rows[r(t, k)]   (the unweighted unpermute)
  unpermute_reduce   y[t] = sum_k w[t, k] rows[r(t, k)]  d_rows[r(t, k)] = w[t, k] dy[t] (the permute of dy, scaled)
                                                         dw[t, k] = <rows[r(t, k)], dy[t]> (float32 sums)
  swiglu             h = silu(g) * u                     dg = dh * u * silu'(g), du = dh * silu(g)

Saved for backward: the permute nothing (the layout), the unpermute its rows and weights, SwiGLU its input
gate_up [N, 2F] (silu and its derivative are recomputed from it, in float32: cheaper than keeping [N, F] twice).
The backward of SwiGLU runs in torch ops; the two others run the Triton kernels.
"""

from __future__ import annotations

import torch

from moekit.kernels.permute import permute_tokens_triton, unpermute_reduce_triton
from moekit.kernels.swiglu import swiglu as swiglu_triton
from moekit.permute import ExpertLayout


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
        ctx.layout = layout
        return permute_tokens_triton(x, layout)

    @staticmethod
    def backward(ctx, d_rows: torch.Tensor):
        return unpermute_reduce_triton(d_rows.contiguous(), ctx.layout, None), None


class _UnpermuteReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, layout: ExpertLayout, topk_weights: torch.Tensor) -> torch.Tensor:
        ctx.layout = layout
        ctx.save_for_backward(rows, topk_weights)
        return unpermute_reduce_triton(rows, layout, topk_weights)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, topk_weights = ctx.saved_tensors
        layout = ctx.layout
        T, K = topk_weights.shape
        dy = dy.contiguous()
        d_rows = d_weights = None
        if ctx.needs_input_grad[0]:
            spread = permute_tokens_triton(dy, layout)  # dy[t] at each of t's rows
            row_weights = torch.zeros(layout.num_rows, dtype=torch.float32, device=dy.device)
            row_weights[layout.assignment_rows] = topk_weights.reshape(-1).float()
            d_rows = (spread.float() * row_weights[:, None]).to(rows.dtype)
        if ctx.needs_input_grad[2]:
            mine = rows.index_select(0, layout.assignment_rows).view(T, K, rows.shape[1]).float()
            d_weights = (mine * dy.float()[:, None, :]).sum(-1).to(topk_weights.dtype)
        return d_rows, None, d_weights


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return swiglu_triton(gate_up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        dh = dh.float()
        d_gate = dh * up * (sig + silu * (1 - sig))
        return torch.cat([d_gate, dh * silu], dim=-1).to(gate_up.dtype)


def permute_tokens(x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """permute_tokens_triton with a backward: x [T, H] -> rows [num_rows, H]."""
    return _Permute.apply(x, layout)


def unpermute_reduce(rows: torch.Tensor, layout: ExpertLayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """unpermute_reduce_triton (weighted) with a backward to rows and topk_weights: rows [num_rows, H] -> [T, H]."""
    return _UnpermuteReduce.apply(rows, layout, topk_weights)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """The Triton SwiGLU with a backward: gate_up [N, 2F] -> [N, F]."""
    return _SwiGLU.apply(gate_up)
