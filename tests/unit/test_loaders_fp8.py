"""DeepSeek-V3-style FP8 expert tensors (e4m3 .weight + .weight_scale_inv per projection) load as they are."""

import pytest
import torch

from moekit import MoEConfig
from moekit.loaders import quantized_weights_from_hf_state_dict, weights_from_hf_state_dict
from moekit.quantize import FP8, quantize, quantize_weights
from moekit.weights import MoEWeights

CONFIG = MoEConfig(hidden_size=200, ffn_size=256, num_experts=3, top_k=2, dtype=torch.bfloat16)


def fp8_state_dict(config: MoEConfig, seed: int = 0) -> tuple[dict, MoEWeights]:
    """An FP8 checkpoint's MoE block (H = 200: partial blocks at the edge) and the bf16 weights it quantizes."""
    g = torch.Generator().manual_seed(seed)
    E, H, F = config.num_experts, config.hidden_size, config.ffn_size
    gate_up = (torch.randn(E, 2 * F, H, generator=g) * H**-0.5).bfloat16()
    down = (torch.randn(E, H, F, generator=g) * F**-0.5).bfloat16()
    state = {"gate.weight": torch.randn(E, H, generator=g)}
    for i in range(E):
        for name, w in (("gate_proj", gate_up[i, :F]), ("up_proj", gate_up[i, F:]), ("down_proj", down[i])):
            q = quantize(w[None], "block")
            state[f"experts.{i}.{name}.weight"] = q.values[0]
            state[f"experts.{i}.{name}.weight_scale_inv"] = q.scale[0]
    return state, MoEWeights(gate_up, down, state["gate.weight"])


def test_fp8_experts_load_bit_for_bit_with_their_block_scales():
    state, weights = fp8_state_dict(CONFIG)
    loaded = quantized_weights_from_hf_state_dict(state, CONFIG)
    F = CONFIG.ffn_size
    assert loaded.scheme == "block" and loaded.w_gate_up.values.dtype == FP8
    for i in range(CONFIG.num_experts):
        gate = state[f"experts.{i}.gate_proj.weight"]
        assert torch.equal(loaded.w_gate_up.values[i, :F].view(torch.uint8), gate.view(torch.uint8)), f"expert {i}"
        assert torch.equal(loaded.w_gate_up.scale[i, F // 128 :], state[f"experts.{i}.up_proj.weight_scale_inv"])
        assert torch.equal(loaded.w_down.scale[i], state[f"experts.{i}.down_proj.weight_scale_inv"])
    # the checkpoint's blocks are the blocks quantize_weights makes of the stacked bf16 weights
    expected = quantize_weights(weights, "block").dequantize(torch.float32)
    got = loaded.dequantize(torch.float32)
    assert torch.equal(got.w_gate_up, expected.w_gate_up) and torch.equal(got.w_down, expected.w_down)
    assert got.router_weight.dtype == torch.float32


def test_bad_fp8_checkpoints_are_refused_naming_the_key():
    state, _ = fp8_state_dict(CONFIG)
    with pytest.raises(ValueError, match="'experts.0.gate_proj.weight_scale_inv': the experts are FP8"):
        weights_from_hf_state_dict(state, CONFIG)
    missing = {k: v for k, v in state.items() if k != "experts.1.down_proj.weight_scale_inv"}
    with pytest.raises(ValueError, match=r"missing key 'experts.1.down_proj.weight_scale_inv'.*shape \(2, 2\)"):
        quantized_weights_from_hf_state_dict(missing, CONFIG)
    wrong = {**state, "experts.2.up_proj.weight_scale_inv": torch.ones(2, 1)}
    with pytest.raises(ValueError, match=r"experts.2.up_proj.weight_scale_inv must have shape \(2, 2\)"):
        quantized_weights_from_hf_state_dict(wrong, CONFIG)
    as_bf16 = {**state, "experts.0.down_proj.weight": state["experts.0.down_proj.weight"].bfloat16()}
    with pytest.raises(TypeError, match="experts.0.down_proj.weight must have dtype in"):
        quantized_weights_from_hf_state_dict(as_bf16, CONFIG)
    extra = {**state, "experts.3.gate_proj.weight": state["experts.0.gate_proj.weight"]}
    with pytest.raises(ValueError, match="unexpected key 'experts.3.gate_proj.weight'"):
        quantized_weights_from_hf_state_dict(extra, CONFIG)
    odd = MoEConfig(hidden_size=200, ffn_size=200, num_experts=3, top_k=2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"ffn_size \(200\) must be a multiple of the 128-row scale block"):
        quantized_weights_from_hf_state_dict(fp8_state_dict(odd)[0], odd)
