"""MoEWeights: every parameter of one MoE layer, in the layout Hugging Face transformers 5 and vLLM use."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import torch

from moekit.config import MoEConfig
from moekit.kernels.availability import triton_on_cuda


@dataclass(frozen=True)
class MoEWeights:
    """Parameters of one MoE layer (E routed experts, S shared experts).

    w_gate_up:  [E, 2F, H]  gate rows first, then up rows
    w_down:     [E, H, F]
    router_weight: [E, H]   logits = x @ router_weight.T (+ router_logit_bias)
    router_logit_bias: [E] or None   added to the logits (synthetic skew lives here)
    score_correction_bias: [E] or None   grouped_topk only: shifts selection, not the weights
    shared_gate_up: [S, 2Fs, H] or None;  shared_down: [S, H, Fs] or None
    """

    w_gate_up: torch.Tensor
    w_down: torch.Tensor
    router_weight: torch.Tensor
    router_logit_bias: torch.Tensor | None = None
    score_correction_bias: torch.Tensor | None = None
    shared_gate_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> MoEWeights:
        """The same weights on device (absent ones stay None)."""
        return replace(self, **{f.name: t.to(device) for f in fields(self) if (t := getattr(self, f.name)) is not None})


def init_weights(
    config: MoEConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    logit_bias: torch.Tensor | None = None,
) -> MoEWeights:
    """Seeded weights on device with magnitudes that keep activations O(1) (std 1/sqrt(fan_in)).

    Expert weights come in config.dtype (drawn in float32, then rounded), router tensors in float32.
    The same seed on the same kind of device gives the same weights. Drawn on the device itself, so
    DeepSeek-V3-sized experts (22 GB in bf16) take seconds, not minutes on the host.
    logit_bias [E] (e.g. from moekit.routing.skew_bias) becomes router_logit_bias.
    """
    E, H, F = config.num_experts, config.hidden_size, config.ffn_size
    if logit_bias is not None and tuple(logit_bias.shape) != (E,):
        raise ValueError(f"logit_bias must have shape ({E},), got {tuple(logit_bias.shape)}")
    g = torch.Generator(device=device).manual_seed(seed)

    def normal(shape, std: float, dtype: torch.dtype = config.dtype) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device=device) * std).to(dtype)

    S, Fs = config.num_shared_experts, config.shared_size
    return MoEWeights(
        w_gate_up=normal((E, 2 * F, H), H**-0.5),
        w_down=normal((E, H, F), F**-0.5),
        router_weight=normal((E, H), H**-0.5, torch.float32),
        router_logit_bias=None if logit_bias is None else logit_bias.to(device),
        score_correction_bias=normal((E,), 0.1, torch.float32) if config.router == "grouped_topk" else None,
        shared_gate_up=normal((S, 2 * Fs, H), H**-0.5) if S else None,
        shared_down=normal((S, H, Fs), Fs**-0.5) if S else None,
    )


@functools.cache
def _mm_has_float32_out(device_index: int) -> bool:
    """Whether this torch multiplies bf16 into a float32 result on CUDA (torch.mm's out_dtype)."""
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=torch.device("cuda", device_index))
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def _bf16_parts(w: torch.Tensor) -> torch.Tensor:
    """w [E, H] float32 -> [3E, H] bf16, the stack of hi, mid, lo with hi + mid + lo = w (3 x 8 significant
    bits: float32's 24). Two parts (16 bits) leave ~2^-17 of each weight out: ~2.4e-6 of the logits. One Triton
    launch on CUDA (moekit.kernels.bf16_parts), these torch ops elsewhere."""
    if triton_on_cuda(w.device, w.dtype):
        from moekit.kernels.bf16_parts import bf16_parts_triton

        return bf16_parts_triton(w)
    hi = w.to(torch.bfloat16)
    rest = w - hi.float()
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return torch.cat([hi, mid, lo])


def _split_bf16_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, H] bf16, w [E, H] float32 -> x @ w.T [T, E] float32, on the tensor cores: w split in three bf16
    parts (_bf16_parts), one bf16 GEMM over the [3E, H] stack with float32 accumulation and output, and the
    three partial logits summed. Each product is exact (x is bf16 already); a float32 GEMM of the same values
    runs on the CUDA cores, an order of magnitude slower, after a float32 copy of x (0.9 ms of a DeepSeek-V3
    layer's 15 at 8K tokens on an H200)."""
    parts = _bf16_parts(w)
    logits = torch.mm(x, parts.T, out_dtype=torch.float32)
    return logits.view(x.shape[0], parts.shape[0] // w.shape[0], w.shape[0]).sum(dim=1)


class _SplitBf16Logits(torch.autograd.Function):
    """_split_bf16_logits with a backward (torch.mm's out_dtype form has none), in float32 on the CUDA cores:
    dx = dlogits @ w (rounded to x's dtype), dw = dlogits.T @ x; [T, E] x [E, H] GEMMs, a small share of a step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return _split_bf16_logits(x, w)

    @staticmethod
    def backward(ctx, d_logits: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = (d_logits @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = d_logits.T @ x.float() if ctx.needs_input_grad[1] else None
        return dx, dw


def router_logits(x: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """x [T, H] -> logits [T, E] in float32 (float64 for float64 x), router_logit_bias added. bf16 x on CUDA
    with a float32 router weight takes the tensor cores at float32 accuracy (_split_bf16_logits)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w = weights.router_weight
    if (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and w.dtype == torch.float32
        and _mm_has_float32_out(x.device.index if x.device.index is not None else torch.cuda.current_device())
    ):
        logits = _SplitBf16Logits.apply(x, w)
    else:
        logits = x.to(acc) @ w.to(acc).T
    if weights.router_logit_bias is not None:
        logits = logits + weights.router_logit_bias.to(acc)
    return logits
