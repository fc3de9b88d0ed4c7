"""MoELayer(quantization=...): FP8 routed experts quantized once at build time, the whole layer (router, FP8
experts, shared experts) against the float64 oracle on the original weights within TOLERANCE[float8_e4m3fn]."""

import dataclasses

import pytest
import torch

from moekit import MoEConfig, MoELayer, init_weights, quantize_weights
from moekit.quantize import FP8, SCHEMES, QuantizedMoEWeights
from moekit.reference import reference_moe
from moekit.testing import assert_close_to_reference
from moekit.testing.fp8_cases import with_spread_blocks

CONFIG = MoEConfig(
    hidden_size=256, ffn_size=192, num_experts=8, top_k=2, num_shared_experts=1, router="grouped_topk",
    n_group=4, topk_group=2, dtype=torch.float32,
)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_layer_is_within_fp8_error_of_the_oracle(scheme, dtype, triton_device):
    config = dataclasses.replace(CONFIG, dtype=dtype)
    weights = with_spread_blocks(init_weights(config, seed=2, device=triton_device), seed=5)
    layer = MoELayer(config, weights=weights, quantization=scheme, device=triton_device)
    assert layer.backend.name == "triton_grouped_fp8"
    buffers = dict(layer.named_buffers())
    assert buffers["w_gate_up_values"].dtype == FP8 and buffers["w_down_scale"].dtype == torch.float32
    assert isinstance(layer.weights, QuantizedMoEWeights) and layer.weights.scheme == scheme
    x = torch.randn(45, config.hidden_size, device=triton_device).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    expected = reference_moe(x, weights, config).y
    assert_close_to_reference(y, expected, torch.float8_e4m3fn, f"FP8 layer ({scheme}, {dtype})")
    assert layer(x[:0]).shape == (0, config.hidden_size)


def test_quantized_weights_are_taken_as_they_are_and_bad_settings_are_refused():
    weights = init_weights(CONFIG, seed=0)
    quantized = quantize_weights(weights, "row")
    layer = MoELayer(CONFIG, weights=quantized)
    assert layer.quantization == "row" and layer.weights.w_down.values is quantized.w_down.values
    with pytest.raises(ValueError, match=r"quantization='block' disagrees with the weights' scheme 'row'"):
        MoELayer(CONFIG, weights=quantized, quantization="block")
    with pytest.raises(ValueError, match=r"quantization must be None or one of \('block', 'row'\), got 'int8'"):
        MoELayer(CONFIG, weights=weights, quantization="int8")
    with pytest.raises(ValueError, match=r"unknown FP8 expert backend 'grouped_loop'"):
        MoELayer(CONFIG, weights=weights, quantization="block", backend="grouped_loop")
    with pytest.raises(ValueError, match=r"dispatcher 'padded' cannot send FP8 rows.*the ones that can: \['nccl'"):
        MoELayer(CONFIG, weights=weights, quantization="block", dispatcher="padded")
