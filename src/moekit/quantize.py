"""FP8 (e4m3) expert weights: the values in the bf16 layouts ([E, 2F, H], [E, H, F]) plus float32 scales.

Two schemes, each a scale per group of one weight's elements, the group's amax mapped to e4m3's largest value:
  "block": one scale per block_size x block_size block of each expert's [N, K] matrix (DeepSeek-V3's
           `weight_scale_inv`, block_size 128), partial blocks at the right and bottom edges;
           scale [E, ceil(N / block_size), ceil(K / block_size)];
  "row":   one scale per output row; scale [E, N, 1].
The scale is the dequantization multiplier (w ~= values * scale, as DeepSeek-V3's checkpoints store it). An
all-zero group gets scale 1: its values are 0 and dequantize to 0, never NaN or inf.

Activations (token rows [M, K]) are quantized the same way per 1 x block_size tile ("block", DeepSeek-V3's
recipe for activations) or per row ("row"): QuantizedRows, quantize_rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from moekit.validation import check_tensor
from moekit.weights import MoEWeights

SCHEMES = ("block", "row")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# scale = amax times this float32 constant: one IEEE multiply, the same bits in torch on the CPU and the GPU and in
# Triton (torch's CUDA division by a scalar multiplies by its reciprocal, so amax / 448 differs by place)
SCALE_PER_AMAX = 1.0 / FP8_MAX
BLOCK_SIZE = 128  # DeepSeek-V3's block


def check_scheme_and_block(scheme: str, block_size: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def scale_shape(shape: tuple[int, int, int], scheme: str, block_size: int = BLOCK_SIZE) -> tuple[int, int, int]:
    """The scale's shape for values of shape [E, N, K] under scheme."""
    E, N, K = shape
    if scheme == "block":
        return E, math.ceil(N / block_size), math.ceil(K / block_size)
    return E, N, 1


@dataclass(frozen=True)
class QuantizedTensor:
    """values [E, N, K] float8_e4m3fn; scale float32 of scale_shape(values.shape, scheme, block_size)."""

    values: torch.Tensor
    scale: torch.Tensor
    scheme: str
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        check_scheme_and_block(self.scheme, self.block_size)
        check_tensor("values", self.values, ndim=3, dtypes=(FP8,))
        expected = scale_shape(tuple(self.values.shape), self.scheme, self.block_size)
        check_tensor(f"scale ({self.scheme} scheme)", self.scale, shape=expected, dtypes=(torch.float32,))
        if self.scale.device != self.values.device:
            raise ValueError(f"scale must be on the values' device {self.values.device}, got {self.scale.device}")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def expanded_scale(self) -> torch.Tensor:
        """The scale of every element, float32 [E, N, K]."""
        return _expand(self.scale, self.scheme, self.block_size, tuple(self.values.shape))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """values * scale [E, N, K] in dtype (computed in float32, or float64 for float64)."""
        acc = torch.promote_types(dtype, torch.float32)
        return (self.values.to(acc) * self.expanded_scale().to(acc)).to(dtype)


def quantize(w: torch.Tensor, scheme: str, block_size: int = BLOCK_SIZE) -> QuantizedTensor:
    """w [E, N, K] (floating) -> QuantizedTensor: each group's amax * SCALE_PER_AMAX is its scale (1 for an all-zero
    group), values = w / scale rounded to e4m3 (saturated at +-FP8_MAX)."""
    check_scheme_and_block(scheme, block_size)
    check_tensor("w", w, ndim=3, floating=True)
    E, N, K = w.shape
    values = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(scale_shape((E, N, K), scheme, block_size), dtype=torch.float32, device=w.device)
    for e in range(E):  # one expert at a time: float32 copies of all of DeepSeek-V3's experts would take 90 GB
        values[e], scale[e] = _quantize_one(w[e : e + 1], scheme, block_size)
    return QuantizedTensor(values, scale, scheme, block_size)


def _quantize_one(w: torch.Tensor, scheme: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [1, N, K] -> (values [N, K] e4m3, scale) under quantize's rule."""
    w32 = w.float()
    E, N, K = w32.shape
    if scheme == "row":
        amax = w32.abs().amax(dim=2, keepdim=True) if K else w32.new_zeros(E, N, 1)
    else:
        _, nb, kb = scale_shape((E, N, K), "block", block_size)
        padded = torch.nn.functional.pad(w32.abs(), (0, kb * block_size - K, 0, nb * block_size - N))
        amax = padded.view(E, nb, block_size, kb, block_size).amax(dim=(2, 4))
    scale = torch.where(amax > 0, amax * SCALE_PER_AMAX, torch.ones_like(amax))
    values = (w32 / _expand(scale, scheme, block_size, (E, N, K))).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return values[0], scale[0]


@dataclass(frozen=True)
class QuantizedRows:
    """Token rows in FP8: values [M, K] float8_e4m3fn; scale float32 [M, ceil(K / block_size)] ("block": one per
    1 x block_size tile of a row) or [M, 1] ("row")."""

    values: torch.Tensor
    scale: torch.Tensor
    scheme: str
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        check_scheme_and_block(self.scheme, self.block_size)
        check_tensor("values", self.values, ndim=2, dtypes=(FP8,))
        M, K = self.values.shape
        expected = (M, math.ceil(K / self.block_size) if self.scheme == "block" else 1)
        check_tensor(f"scale ({self.scheme} scheme)", self.scale, shape=expected, dtypes=(torch.float32,))
        if self.scale.device != self.values.device:
            raise ValueError(f"scale must be on the values' device {self.values.device}, got {self.scale.device}")

    def element_scale(self) -> torch.Tensor:
        """Each value's scale: [M, K] ("block") or [M, 1] ("row"), float32."""
        if self.scheme == "row":
            return self.scale
        return self.scale.repeat_interleave(self.block_size, dim=1)[:, : self.values.shape[1]]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """values * scale [M, K] in dtype (computed in float32, or float64 for float64)."""
        acc = torch.promote_types(dtype, torch.float32)
        return (self.values.to(acc) * self.element_scale().to(acc)).to(dtype)


def quantize_rows(x: torch.Tensor, scheme: str, block_size: int = BLOCK_SIZE) -> QuantizedRows:
    """x [M, K] (floating) -> QuantizedRows: per 1 x block_size tile ("block") or per row ("row"), with quantize's
    rule (scale = amax * SCALE_PER_AMAX, 1 for an all-zero group)."""
    check_scheme_and_block(scheme, block_size)
    check_tensor("x", x, ndim=2, floating=True)
    M, K = x.shape
    if scheme == "row":
        q = quantize(x[None], "row")
        return QuantizedRows(q.values[0], q.scale[0], "row", block_size)
    tiles = math.ceil(K / block_size)  # each tile a row of its own: zero padding leaves every amax as it is
    padded = torch.nn.functional.pad(x.float(), (0, tiles * block_size - K)).view(1, M * tiles, block_size)
    q = quantize(padded, "row")
    values = q.values.view(M, tiles * block_size)[:, :K].contiguous()
    return QuantizedRows(values, q.scale.view(M, tiles), "block", block_size)


def _expand(scale: torch.Tensor, scheme: str, block_size: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """A scale of scale_shape(shape, scheme, block_size) -> every element's [E, N, K]."""
    if scheme == "row":
        return scale.expand(shape)
    _, N, K = shape
    return scale.repeat_interleave(block_size, dim=1)[:, :N].repeat_interleave(block_size, dim=2)[:, :, :K]


@dataclass(frozen=True)
class QuantizedMoEWeights:
    """MoEWeights with the routed experts' two matrices in FP8 (w_gate_up [E, 2F, H], w_down [E, H, F] as
    QuantizedTensor, one scheme); the router and the shared experts stay as they are."""

    w_gate_up: QuantizedTensor
    w_down: QuantizedTensor
    router_weight: torch.Tensor
    router_logit_bias: torch.Tensor | None = None
    score_correction_bias: torch.Tensor | None = None
    shared_gate_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None

    def __post_init__(self) -> None:
        gate_up, down = self.w_gate_up, self.w_down
        if gate_up.scheme != down.scheme or gate_up.block_size != down.block_size:
            raise ValueError(
                f"w_gate_up and w_down must share one scheme, got {gate_up.scheme}/{gate_up.block_size} and "
                f"{down.scheme}/{down.block_size}"
            )
        E, two_F, H = gate_up.shape
        if two_F % 2 or tuple(down.shape) != (E, H, two_F // 2):
            raise ValueError(
                f"w_down must have shape ({E}, {H}, {two_F // 2}) beside w_gate_up {tuple(gate_up.shape)}, "
                f"got {tuple(down.shape)}"
            )

    @property
    def scheme(self) -> str:
        return self.w_gate_up.scheme

    def dequantize(self, dtype: torch.dtype = torch.float32) -> MoEWeights:
        """The MoEWeights these stand for, the routed experts as values * scale in dtype (the oracle's input)."""
        return MoEWeights(self.w_gate_up.dequantize(dtype), self.w_down.dequantize(dtype), **_besides_experts(self))


def _besides_experts(weights: MoEWeights | QuantizedMoEWeights) -> dict:
    """Every field but the routed experts' w_gate_up and w_down: the router and the shared experts."""
    return {f.name: getattr(weights, f.name) for f in fields(weights) if f.name not in ("w_gate_up", "w_down")}


def quantize_weights(weights: MoEWeights, scheme: str, block_size: int = BLOCK_SIZE) -> QuantizedMoEWeights:
    """MoEWeights -> QuantizedMoEWeights: the routed experts quantized once under scheme ("block" or "row")."""
    gate_up, down = (quantize(w, scheme, block_size) for w in (weights.w_gate_up, weights.w_down))
    return QuantizedMoEWeights(gate_up, down, **_besides_experts(weights))
