"""moekit.loaders against the transformers MoE blocks: Mixtral, Qwen3-MoE and DeepSeek-V3, both state-dict layouts."""

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

from moekit.config import MoEConfig  # noqa: E402
from moekit.layer import MoELayer  # noqa: E402
from moekit.loaders import config_from_hf, weights_from_hf_state_dict  # noqa: E402
from moekit.testing import TOLERANCE, assert_close_to_reference, relative_error  # noqa: E402

H, F, E, K = 64, 24, 8, 2  # 2F != H and F != H: a transposed or swapped tensor fails the shape checks
DTYPE = torch.float32


def hf_config(model_type: str, **overrides):
    if model_type == "mixtral":
        kwargs = dict(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
        return transformers.MixtralConfig(**{**kwargs, **overrides})
    if model_type == "qwen3_moe":
        kwargs = dict(hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True)
        return transformers.Qwen3MoeConfig(**{**kwargs, **overrides})
    kwargs = dict(
        hidden_size=H,
        moe_intermediate_size=F,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    return transformers.DeepseekV3Config(**{**kwargs, **overrides})


BLOCKS = {"mixtral": MixtralSparseMoeBlock, "qwen3_moe": Qwen3MoeSparseMoeBlock, "deepseek_v3": DeepseekV3MoE}
CASES = [
    ("mixtral", {}),
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("deepseek_v3", {"norm_topk_prob": True}),
    ("deepseek_v3", {"norm_topk_prob": False, "n_shared_experts": 2}),
]
IDS = ["mixtral", "qwen3_moe-renorm", "qwen3_moe-no-renorm", "deepseek_v3-renorm", "deepseek_v3-no-renorm-2-shared"]


def hf_block(model_type: str, seed: int, **overrides):
    """A float32 HF MoE block in eval mode with every parameter and buffer redrawn (none left at 0)."""
    hf = hf_config(model_type, **overrides)
    hf._experts_implementation = "eager"  # the block stands alone: no model picked an implementation for it
    block = BLOCKS[model_type](hf).to(DTYPE).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in block.state_dict().values():
            scale = tensor.shape[-1] ** -0.5 if tensor.dim() >= 2 else 0.1  # matrices: std 1/sqrt(fan_in)
            tensor.copy_(torch.randn(tensor.shape, generator=g) * scale)
    return hf, block


def run_hf(block, x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H] -> [T, H]; some blocks return (hidden, router_logits)."""
    with torch.no_grad():
        out = block(x)
    return (out[0] if isinstance(out, tuple) else out).reshape(-1, x.shape[-1])


def random_x(seed: int, batch: int = 3, seq: int = 11) -> torch.Tensor:
    return torch.randn(batch, seq, H, generator=torch.Generator().manual_seed(seed))


def per_expert_state_dict(fused: dict, model_type: str, prefix: str = "") -> dict:
    """The Hub checkpoint layout of a fused block state dict: experts.{i}.<gate|up|down>.weight."""
    gate_name, up_name, down_name = (
        ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    )
    out = {}
    for key, tensor in fused.items():
        if key == "experts.gate_up_proj":
            for i in range(tensor.shape[0]):
                out[f"{prefix}experts.{i}.{gate_name}.weight"] = tensor[i, :F].clone()
                out[f"{prefix}experts.{i}.{up_name}.weight"] = tensor[i, F:].clone()
        elif key == "experts.down_proj":
            for i in range(tensor.shape[0]):
                out[f"{prefix}experts.{i}.{down_name}.weight"] = tensor[i].clone()
        else:
            out[prefix + key] = tensor
    return out


def moekit_out(hf, state_dict: dict, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    config = config_from_hf(hf, dtype=DTYPE)
    layer = MoELayer(
        config, backend="grouped_loop", weights=weights_from_hf_state_dict(state_dict, config, prefix=prefix)
    )
    return layer(x.reshape(-1, H))


@pytest.mark.parametrize(("model_type", "overrides"), CASES, ids=IDS)
def test_layer_from_fused_state_dict_matches_hf_block(model_type, overrides):
    hf, block = hf_block(model_type, seed=1, **overrides)
    x = random_x(seed=2)
    assert_close_to_reference(moekit_out(hf, block.state_dict(), x), run_hf(block, x), DTYPE, model_type)


@pytest.mark.parametrize(("model_type", "overrides"), CASES[::2], ids=IDS[::2])
def test_layer_from_hub_per_expert_state_dict_matches_hf_block(model_type, overrides):
    hf, block = hf_block(model_type, seed=3, **overrides)
    x = random_x(seed=4)
    prefix = "model.layers.3.block_sparse_moe." if model_type == "mixtral" else "model.layers.3.mlp."
    state_dict = per_expert_state_dict(block.state_dict(), model_type, prefix)
    # keys of other modules and layers are ignored
    state_dict["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(H, H)
    state_dict["model.layers.4.mlp.experts.0.gate_proj.weight"] = torch.zeros(1)
    state_dict["model.layers.31.mlp.gate.weight"] = torch.zeros(1)
    assert_close_to_reference(moekit_out(hf, state_dict, x, prefix), run_hf(block, x), DTYPE, model_type)


def test_fused_layout_is_not_copied_and_router_tensors_are_float32():
    hf, block = hf_block("deepseek_v3", seed=5)
    state_dict = block.state_dict()
    weights = weights_from_hf_state_dict(state_dict, config_from_hf(hf, dtype=DTYPE))
    assert weights.w_gate_up.data_ptr() == state_dict["experts.gate_up_proj"].data_ptr()
    assert weights.w_down.data_ptr() == state_dict["experts.down_proj"].data_ptr()
    half = weights_from_hf_state_dict(state_dict, config_from_hf(hf, dtype=torch.bfloat16))
    assert half.w_gate_up.dtype == half.shared_gate_up.dtype == torch.bfloat16
    assert half.router_weight.dtype == half.score_correction_bias.dtype == torch.float32
    assert tuple(half.shared_gate_up.shape) == (1, 2 * F, H) and tuple(half.shared_down.shape) == (1, H, F)


def test_deepseek_v3_correction_bias_changes_the_output_and_still_matches_hf():
    hf, block = hf_block("deepseek_v3", seed=6)
    x = random_x(seed=7)
    before = moekit_out(hf, block.state_dict(), x)
    with torch.no_grad():
        block.gate.e_score_correction_bias.add_(torch.randn(E, generator=torch.Generator().manual_seed(8)))
    after = moekit_out(hf, block.state_dict(), x)
    assert_close_to_reference(after, run_hf(block, x), DTYPE, "deepseek_v3 with a new bias")
    assert relative_error(after, before) > 100 * TOLERANCE[DTYPE]  # the bias moved the selection


def test_config_from_hf_maps_each_model():
    sizes = dict(hidden_size=H, ffn_size=F, num_experts=E, top_k=K)
    assert config_from_hf(hf_config("mixtral")) == MoEConfig(**sizes, router="topk_softmax", dtype=torch.float32)
    assert config_from_hf(hf_config("qwen3_moe", norm_topk_prob=False), dtype=torch.bfloat16) == MoEConfig(
        **sizes, router="softmax_topk", renormalize=False, dtype=torch.bfloat16
    )
    grouped = dict(router="grouped_topk", n_group=4, topk_group=2, routed_scaling_factor=2.5, dtype=torch.float32)
    assert config_from_hf(hf_config("deepseek_v3", n_shared_experts=2)) == MoEConfig(
        **sizes, **grouped, renormalize=True, num_shared_experts=1, shared_ffn_size=2 * F
    )
    assert config_from_hf(hf_config("deepseek_v3", n_shared_experts=0)) == MoEConfig(**sizes, **grouped)


def test_unknown_model_type_and_activation_are_refused():
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'.*mixtral, qwen3_moe, deepseek_v3"):
        config_from_hf(transformers.LlamaConfig())
    with pytest.raises(ValueError, match=r"unsupported model_type None"):
        config_from_hf(SimpleNamespace(hidden_size=H))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        config_from_hf(hf_config("mixtral", hidden_act="gelu"))


def test_missing_keys_are_named_with_their_shape():
    hf, block = hf_block("deepseek_v3", seed=9)
    config = config_from_hf(hf, dtype=DTYPE)
    fused = dict(block.state_dict())
    for key, shape in [
        ("gate.weight", r"\(8, 64\)"),
        ("gate.e_score_correction_bias", r"\(8,\)"),
        ("experts.gate_up_proj", r"\(8, 48, 64\)"),
        ("shared_experts.down_proj.weight", r"\(64, 24\)"),
    ]:
        state_dict = {k: v for k, v in fused.items() if k != key}
        with pytest.raises(ValueError, match=rf"missing key 'layer\.{key}'.*shape {shape}"):
            weights_from_hf_state_dict({f"layer.{k}": v for k, v in state_dict.items()}, config, prefix="layer.")
    hub = per_expert_state_dict(fused, "deepseek_v3")
    del hub["experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing key 'experts\.5\.up_proj\.weight'.*shape \(24, 64\)"):
        weights_from_hf_state_dict(hub, config)


def test_wrong_shapes_mixed_layouts_and_extra_experts_are_refused():
    hf, block = hf_block("mixtral", seed=10)
    config = config_from_hf(hf, dtype=DTYPE)
    fused = dict(block.state_dict())
    transposed = {**fused, "experts.down_proj": fused["experts.down_proj"].transpose(1, 2)}
    with pytest.raises(ValueError, match=r"experts\.down_proj must have shape \(8, 64, 24\), got \(8, 24, 64\)"):
        weights_from_hf_state_dict(transposed, config)
    hub = per_expert_state_dict(fused, "mixtral")
    hub["experts.2.w2.weight"] = hub["experts.2.w2.weight"].T
    with pytest.raises(ValueError, match=r"experts\.2\.w2\.weight must have shape \(64, 24\), got \(24, 64\)"):
        weights_from_hf_state_dict(hub, config)
    with pytest.raises(ValueError, match=r"mixes the fused layout \('experts\.gate_up_proj'\).*'experts\.0\.w1"):
        weights_from_hf_state_dict({**fused, **per_expert_state_dict(fused, "mixtral")}, config)
    extra = {**per_expert_state_dict(fused, "mixtral"), "experts.8.w1.weight": torch.zeros(F, H)}
    with pytest.raises(ValueError, match=r"unexpected key 'experts\.8\.w1\.weight'.*num_experts=8"):
        weights_from_hf_state_dict(extra, config)
    ds_hf, ds_block = hf_block("deepseek_v3", seed=11)
    with pytest.raises(ValueError, match=r"unexpected key 'gate\.e_score_correction_bias'.*topk_softmax"):
        weights_from_hf_state_dict(ds_block.state_dict(), config)
