"""moekit's Triton kernels under autograd, each backward built from the others' kernels:

  permute            rows[r(t, k)] = x[t]               dx[t] = sum_k d_rows[r(t, k)]   (the unweighted unpermute)
  unpermute_sum      y[t] = sum_k rows[r(t, k)]          d_rows[r(t, k)] = dy[t]         (the permute of dy)
  unpermute_reduce   y[t] = sum_k w[t, k] rows[r(t, k)]  d_rows[r(t, k)] = w[t, k] dy[t]
                                                         dw[t, k] = <rows[r(t, k)], dy[t]> (float32 sums)
                                                         (one pass over dy: unpermute_reduce_backward_triton)
  swiglu             h = silu(g) * u                     dg = dh * u * silu'(g), du = dh * silu(g)
  sorted_rows_mlp    out = s * (silu(g) * u) @ Wd[e].T   four grouped launches, below
                     [g, u] = rows @ Wgu[e].T

Saved for backward: the permute nothing (the layout), the unpermute its rows and weights, SwiGLU its input
gate_up [N, 2F] (silu and its derivative are recomputed from it, in float32: cheaper than keeping [N, F] twice).
Every backward runs Triton kernels; SwiGLU's is one pass (kernels.swiglu.swiglu_backward) where torch ops took
six float32 temporaries of [N, F] and a concatenation.

sorted_rows_mlp is two autograd nodes, so that the pre-activation is freed as early as the peer's SwiGLU frees it:
  _GateUpSwiGLU   rows -> (gate_up [M, 2F], activation [M, F]); keeps rows [M, H]
  _ActivatedDown  (gate_up, activation) -> s * activation @ Wd[e].T; keeps gate_up, which autograd frees when its
                  backward returns, before the gate/up GEMM's backward allocates d_rows and dWgu
The activation is recomputed in the backward rather than kept, nothing else of the down GEMM is kept.
The backward, per expert e over its rows:
  d_act = d_out @ Wd[e]: one grouped GEMM on Wd transposed, whose epilogue also gives ds = <act, d_act>,
          d_gate_up = SwiGLU's backward of s * d_act, and s * act (grouped_gemm_swiglu_backward)
  dWd[e] = d_out.T @ (s * act)   and   dWgu[e] = d_gate_up.T @ rows   (grouped_weight_grad)
  d_rows = d_gate_up @ Wgu[e]: a grouped GEMM on Wgu transposed
Where torch._grouped_mm takes the device, dtype and sizes (backward_on_grouped_mm; bf16 on Hopper, the CPU), the
GEMMs it runs faster run on it instead, SwiGLU's backward then one Triton pass (kernels.swiglu.scaled_swiglu_backward):
on Hopper all but d_rows and the weight gradients of small weights, whose Triton GEMMs with descriptor loads are
the faster ones; the Triton GEMMs above run everywhere else.
"""

from __future__ import annotations

import os

import torch

from moekit.kernels.grouped_gemm import copy_engine_loads, grouped_gemm, grouped_gemm_swiglu_backward
from moekit.kernels.grouped_weight_grad import grouped_weight_grad
from moekit.kernels.permute import permute_tokens_triton, unpermute_reduce_backward_triton, unpermute_reduce_triton
from moekit.kernels.swiglu import scaled_swiglu_backward, swiglu_backward
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


class _UnpermuteSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
        ctx.layout = layout
        return unpermute_reduce_triton(rows, layout, None)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return permute_tokens_triton(dy.contiguous(), ctx.layout), None


class _UnpermuteReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, layout: ExpertLayout, topk_weights: torch.Tensor) -> torch.Tensor:
        ctx.layout = layout
        ctx.save_for_backward(rows, topk_weights)
        return unpermute_reduce_triton(rows, layout, topk_weights)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, topk_weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d_rows, d_weights = unpermute_reduce_backward_triton(dy, rows, ctx.layout, topk_weights, needs[0], needs[2])
        return d_rows, None, d_weights


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return swiglu_triton(gate_up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up, dh)


class _GateUpSwiGLU(torch.autograd.Function):
    """rows [M, H] -> (gate_up [M, 2F], activation = silu(g) * u [M, F]): one grouped GEMM, SwiGLU in its epilogue.
    Only gate_up takes a gradient: _ActivatedDown's backward turns d_activation into d_gate_up. This node keeps
    rows alone, so the pre-activation lives in _ActivatedDown's saved tensors only and autograd frees it as soon
    as that backward returns, before the two GEMMs here allocate (as the peer's SwiGLU frees it)."""

    @staticmethod
    def forward(ctx, rows, w_gate_up, expert_offsets, ends, padded, on_grouped_mm):
        ctx.padded = padded
        if on_grouped_mm:
            gate_up = torch._grouped_mm(rows, w_gate_up.transpose(1, 2), offs=ends)
            activation = swiglu_triton(gate_up)
        else:
            gate_up = rows.new_empty(rows.shape[0], w_gate_up.shape[1])
            activation = grouped_gemm(rows, w_gate_up, expert_offsets, swiglu=True, gate_up_out=gate_up)
        ctx.mark_non_differentiable(activation)
        ctx.set_materialize_grads(False)  # no [M, F] of zeros for the activation's absent gradient
        ctx.save_for_backward(rows, w_gate_up, expert_offsets, ends)
        return gate_up, activation

    @staticmethod
    def backward(ctx, d_gate_up: torch.Tensor, _d_activation: None):  # gate_up always feeds _ActivatedDown
        rows, w_gate_up, expert_offsets, ends = ctx.saved_tensors
        d_gate_up = d_gate_up.contiguous()
        needs = ctx.needs_input_grad
        d_rows = d_w_gate_up = None
        if needs[0] and backward_on_grouped_mm(w_gate_up, "gate_up.input"):
            d_rows = torch._grouped_mm(d_gate_up, w_gate_up, offs=ends)
            if ctx.padded:  # torch._grouped_mm leaves rows past the last offset unspecified: padding gets zero
                padding = torch.arange(rows.shape[0], device=rows.device) >= expert_offsets[-1]
                d_rows.masked_fill_(padding[:, None], 0)
        elif needs[0]:  # the kernel writes rows below expert_offsets[E]: padding rows past it get zero
            d_rows = torch.zeros_like(rows) if ctx.padded else torch.empty_like(rows)
            grouped_gemm(d_gate_up, w_gate_up.transpose(1, 2), expert_offsets, out=d_rows)
        if needs[1]:
            d_w_gate_up = weight_grad(d_gate_up, rows, expert_offsets, ends, w_gate_up, "gate_up.weight")
        return d_rows, d_w_gate_up, None, None, None, None


class _ActivatedDown(torch.autograd.Function):
    """(gate_up [M, 2F], activation [M, F] = its SwiGLU) -> out = s * activation @ Wd[e].T [M, H]. Keeps gate_up,
    not the activation: the backward recomputes s * activation from gate_up in the pass that gives d_gate_up."""

    @staticmethod
    def forward(ctx, gate_up, activation, w_down, expert_offsets, ends, row_scale, on_grouped_mm):
        ctx.save_for_backward(gate_up, w_down, expert_offsets, ends, row_scale)
        if on_grouped_mm:  # row_scale is None (checked by sorted_rows_mlp)
            return torch._grouped_mm(activation, w_down.transpose(1, 2), offs=ends)
        return grouped_gemm(activation, w_down, expert_offsets, row_scale=row_scale)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        gate_up, w_down, expert_offsets, ends, row_scale = ctx.saved_tensors
        d_out = d_out.contiguous()
        needs = ctx.needs_input_grad
        if backward_on_grouped_mm(w_down, "down.input"):
            d_activation = torch._grouped_mm(d_out, w_down, offs=ends)
            # rows past the last offset are unspecified there: the SwiGLU pass reads them as zeros
            d_gate_up, scaled_activation, d_scale = scaled_swiglu_backward(gate_up, d_activation, row_scale, ends[-1:])
            del d_activation  # [M, F] freed before dW_down allocates
        else:
            d_gate_up, scaled_activation, d_scale = grouped_gemm_swiglu_backward(
                d_out, w_down, expert_offsets, gate_up, row_scale
            )
        d_w_down = None
        if needs[2]:
            d_w_down = weight_grad(d_out, scaled_activation, expert_offsets, ends, w_down, "down.weight")
        return d_gate_up, None, d_w_down, None, None, d_scale if needs[5] else None, None


def weight_grad(d_out, inputs, expert_offsets, ends, weight, gemm) -> torch.Tensor:
    """weight's gradient, d_out[rows of e].T @ inputs[rows of e] per expert, on the path backward_on_grouped_mm
    picks for gemm: d_out [M, P], inputs [M, Q] -> [E, P, Q]."""
    if backward_on_grouped_mm(weight, gemm):
        return torch._grouped_mm(d_out.t(), inputs, offs=ends)
    return grouped_weight_grad(d_out, inputs, expert_offsets)


# sorted_rows_mlp's backward GEMMs, each named by its weight and the gradient it gives
BACKWARD_GEMMS = ("gate_up.input", "gate_up.weight", "down.input", "down.weight")
# those that run on the Triton kernels where the tiles load through tensor descriptors, though torch._grouped_mm
# could take them: measured faster on an H200 (tools/backward_pieces.py, bf16): d_rows at T = 8192 701 against
# 648 TFLOP/s (Mixtral), 551 against 506 (Qwen3-30B-A3B), 522 against 451 (DeepSeek-V3; 398 against 290 at
# T = 4096). d_act's SwiGLU epilogue holds the Triton GEMM to 150-290 TFLOP/s against torch's 430-660 with a
# separate SwiGLU pass: it stays on torch.
_TRITON_WITH_DESCRIPTORS = ("gate_up.input",)
# The weight gradients of small weights (at most this many elements per expert) also run on Triton there: at
# Qwen3-30B-A3B's shape (1536 x 2048 and 2048 x 768, T = 4096) Triton's ran 433 and 423 TFLOP/s against torch's
# 363 and 371 on an H200, and its training step 2.80-3.02 against 2.87-3.19 ms (grouped_mm_fused, two runs each);
# at DeepSeek-V3's (4096 x 7168) the two tie and its T = 8192 step was 3-6% slower, at Mixtral's (28672 x 4096)
# the steps moved both ways.
SMALL_WEIGHT_ELEMENTS = 2**22
_WEIGHT_GRADIENTS = ("gate_up.weight", "down.weight")


def backward_on_grouped_mm(weight: torch.Tensor, gemm: str) -> bool:
    """Whether sorted_rows_mlp's backward GEMM `gemm` (one of BACKWARD_GEMMS) on weight ([E, 2F, H] or [E, H, F])
    runs on torch._grouped_mm rather than on the Triton kernels: where torch takes the device, the dtype and the
    sizes (16-byte rows), unless the GEMM is one that the Triton kernels run faster with descriptor loads (d_rows,
    and the weight gradients of small weights).
    MOEKIT_TRITON_BACKWARD (comma-separated names, or "all", or "" for none) names the Triton ones instead, to
    compare. With pointer loads torch._grouped_mm ran every one of them 1.1x-3.5x faster on an H200 (d_act 640 vs
    238 TFLOP/s, dW_gate_up 612 vs 345 at Mixtral's shape, T = 8192)."""
    from moekit.experts.grouped_mm import grouped_mm_support, sixteen_byte_rows

    if gemm not in BACKWARD_GEMMS:
        raise ValueError(f"gemm must be one of {BACKWARD_GEMMS}, got {gemm!r}")
    if gemm in _triton_gemms(weight):
        return False
    multiple = sixteen_byte_rows(weight.dtype)
    aligned = weight.shape[1] % multiple == 0 and weight.shape[2] % multiple == 0
    return aligned and grouped_mm_support(weight.device, weight.dtype)[0]


def _triton_gemms(weight: torch.Tensor) -> tuple[str, ...]:
    chosen = os.environ.get("MOEKIT_TRITON_BACKWARD")
    if chosen is None:
        if not copy_engine_loads(weight.device):
            return ()
        small = weight.shape[1] * weight.shape[2] <= SMALL_WEIGHT_ELEMENTS
        return _TRITON_WITH_DESCRIPTORS + (_WEIGHT_GRADIENTS if small else ())
    names = BACKWARD_GEMMS if chosen == "all" else tuple(name for name in chosen.split(",") if name)
    if unknown := [name for name in names if name not in BACKWARD_GEMMS]:
        raise ValueError(f"MOEKIT_TRITON_BACKWARD names {unknown}: expected names from {BACKWARD_GEMMS} or 'all'")
    return names


def permute_tokens(x: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """permute_tokens_triton with a backward: x [T, H] -> rows [num_rows, H]."""
    return _Permute.apply(x, layout)


def unpermute_sum(rows: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """unpermute_reduce_triton (unweighted) with a backward: rows [num_rows, H] -> [T, H]."""
    return _UnpermuteSum.apply(rows, layout)


def unpermute_reduce(rows: torch.Tensor, layout: ExpertLayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """unpermute_reduce_triton (weighted) with a backward to rows and topk_weights: rows [num_rows, H] -> [T, H]."""
    return _UnpermuteReduce.apply(rows, layout, topk_weights)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """The Triton SwiGLU with a backward: gate_up [N, 2F] -> [N, F]."""
    return _SwiGLU.apply(gate_up)


def sorted_rows_mlp(
    rows: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    expert_offsets: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    *,
    padded: bool = True,
    forward_on_grouped_mm: bool = False,
) -> torch.Tensor:
    """The two grouped GEMMs of triton_grouped with a backward to rows, both weights and row_scale:
    rows [M, H] sorted by expert, w_gate_up [E, 2F, H], w_down [E, H, F], row_scale [M] float32 -> [M, H].
    padded=False promises that expert_offsets[E] = M (no padding rows): the backward then does not zero d_rows
    past it (on torch._grouped_mm a masked fill, a read and a write of all [M, H]; on the Triton GEMM a fill).
    forward_on_grouped_mm runs the forward's GEMMs on torch._grouped_mm with the Triton SwiGLU pass between them
    (grouped_mm_fused's forward; the backward is the same); it needs padded=False, because torch leaves the rows
    past expert_offsets[E] unspecified and SwiGLU's backward would read them, and no row_scale (the caller weighs
    the rows in its unpermute)."""
    if forward_on_grouped_mm and (padded or row_scale is not None):
        raise ValueError(
            "forward_on_grouped_mm needs padded=False (torch._grouped_mm leaves padding rows unspecified) and "
            f"row_scale=None, got padded={padded}, row_scale {'given' if row_scale is not None else 'None'}"
        )
    ends = expert_offsets[1:].to(torch.int32)  # torch._grouped_mm's offsets, for both nodes and their backwards
    gate_up, activation = _GateUpSwiGLU.apply(rows, w_gate_up, expert_offsets, ends, padded, forward_on_grouped_mm)
    return _ActivatedDown.apply(gate_up, activation, w_down, expert_offsets, ends, row_scale, forward_on_grouped_mm)
