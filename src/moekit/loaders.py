"""Hugging Face loaders: a MoEConfig from a transformers config, MoEWeights from a MoE block's state dict.

Supported: Mixtral (MixtralSparseMoeBlock), Qwen3-MoE (Qwen3MoeSparseMoeBlock), DeepSeek-V3 (DeepseekV3MoE).

    config = config_from_hf(model.config, dtype=torch.bfloat16)
    weights = weights_from_hf_state_dict(model.state_dict(), config, prefix="model.layers.3.mlp.")
    layer = MoELayer(config, backend="grouped_loop", weights=weights)
    y = layer(x.reshape(-1, config.hidden_size)).reshape(x.shape)

Two state-dict layouts are read:
  fused (transformers 5 modules in memory):  experts.gate_up_proj [E, 2F, H] (gate rows first, then up rows),
      experts.down_proj [E, H, F]; the layout of MoEWeights, so no copy when the dtype already matches.
  per-expert (checkpoints on the Hub):  experts.{i}.w1 / w3 / w2 .weight (Mixtral: gate / up / down) or
      experts.{i}.gate_proj / up_proj / down_proj .weight (Qwen3-MoE, DeepSeek-V3): [F, H], [F, H], [H, F].
Both: gate.weight [E, H] (the router); DeepSeek-V3 also gate.e_score_correction_bias [E] and
shared_experts.{gate,up,down}_proj.weight [Fs, H], [Fs, H], [H, Fs] (one shared MLP of Fs = F * n_shared_experts).
FP8 checkpoints (DeepSeek-V3's): per-expert .weight in float8_e4m3fn beside .weight_scale_inv [ceil(N/128),
ceil(K/128)] float32; quantized_weights_from_hf_state_dict loads them as they are (QuantizedMoEWeights, "block"),
and weights_from_hf_state_dict refuses them rather than read the e4m3 values without their scales.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from moekit.config import MoEConfig
from moekit.quantize import BLOCK_SIZE, FP8, QuantizedMoEWeights, QuantizedTensor, scale_shape
from moekit.validation import check_tensor
from moekit.weights import MoEWeights

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen3_moe", "deepseek_v3")

# per-expert projection names: (gate, up, down)
_MIXTRAL_NAMES = ("w1", "w3", "w2")
_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


def config_from_hf(hf_config, *, dtype: torch.dtype = torch.float32) -> MoEConfig:
    """MoEConfig of one MoE layer of a transformers MixtralConfig, Qwen3MoeConfig or DeepseekV3Config.

    Mixtral      -> router "topk_softmax" (HF's softmax -> top-k -> renormalise selects and weighs the same).
    Qwen3-MoE    -> router "softmax_topk", renormalize = norm_topk_prob.
    DeepSeek-V3  -> router "grouped_topk" with n_group, topk_group, routed_scaling_factor,
                    renormalize = norm_topk_prob, and its shared MLP as one shared expert of
                    moe_intermediate_size * n_shared_experts (none when n_shared_experts is 0).
    dtype: the MoEConfig dtype (activations and expert weights). Dense layers of these models
    (Qwen3-MoE mlp_only_layers, DeepSeek-V3's first_k_dense_replace) are not MoE layers: do not load them.
    Raises ValueError for another model_type or an activation other than SiLU.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{model_type} config has hidden_act {act!r}: moekit's experts are SwiGLU (silu) only")
    common = dict(hidden_size=hf_config.hidden_size, top_k=hf_config.num_experts_per_tok, dtype=dtype)
    if model_type == "mixtral":
        return MoEConfig(
            ffn_size=hf_config.intermediate_size,
            num_experts=hf_config.num_local_experts,
            router="topk_softmax",
            **common,
        )
    if model_type == "qwen3_moe":
        return MoEConfig(
            ffn_size=hf_config.moe_intermediate_size,
            num_experts=hf_config.num_experts,
            router="softmax_topk",
            renormalize=bool(hf_config.norm_topk_prob),
            **common,
        )
    n_shared = hf_config.n_shared_experts or 0
    return MoEConfig(
        ffn_size=hf_config.moe_intermediate_size,
        num_experts=hf_config.n_routed_experts,
        router="grouped_topk",
        renormalize=bool(hf_config.norm_topk_prob),
        n_group=hf_config.n_group or 1,
        topk_group=hf_config.topk_group or 1,
        routed_scaling_factor=float(hf_config.routed_scaling_factor),
        num_shared_experts=1 if n_shared else 0,
        shared_ffn_size=hf_config.moe_intermediate_size * n_shared if n_shared else None,
        **common,
    )


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _get(state_dict: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """state_dict[key], checked to be a floating tensor of the given shape (ValueError names key and shape)."""
    if key not in state_dict:
        raise ValueError(f"missing key {key!r}: expected {what}, a tensor of shape {_shape_text(shape)}")
    tensor = state_dict[key]
    check_tensor(key, tensor, shape=shape, floating=True)
    return tensor.detach()


def _per_expert_names(expert_keys: list[str], prefix: str) -> tuple[str, str, str]:
    """(gate, up, down) projection names used by the per-expert keys: Mixtral's w1/w3/w2 or *_proj."""
    pattern = re.compile(re.escape(prefix) + r"experts\.\d+\.([^.]+)\.")
    used = {m.group(1) for key in expert_keys if (m := pattern.match(key))}
    mixtral, proj = used & set(_MIXTRAL_NAMES), used & set(_PROJ_NAMES)
    if mixtral and proj:
        raise ValueError(
            f"per-expert keys under {prefix!r}experts. mix Mixtral names {sorted(mixtral)} with "
            f"{sorted(proj)}: expected one of {_MIXTRAL_NAMES} (gate, up, down) or {_PROJ_NAMES}"
        )
    return _MIXTRAL_NAMES if mixtral else _PROJ_NAMES


def _stack_per_expert(
    state_dict: Mapping[str, torch.Tensor], config: MoEConfig, prefix: str, expert_keys: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert [F, H] gate, [F, H] up, [H, F] down -> w_gate_up [E, 2F, H], w_down [E, H, F] in config.dtype."""
    E, H, F = config.num_experts, config.hidden_size, config.ffn_size
    _check_expert_indices(expert_keys, prefix, E)
    gate_name, up_name, down_name = _per_expert_names(expert_keys, prefix)
    first = _get(state_dict, f"{prefix}experts.0.{gate_name}.weight", (F, H), "expert 0's gate projection")
    w_gate_up = torch.empty((E, 2 * F, H), dtype=config.dtype, device=first.device)
    w_down = torch.empty((E, H, F), dtype=config.dtype, device=first.device)
    for i in range(E):
        base = f"{prefix}experts.{i}."
        w_gate_up[i, :F] = _get(state_dict, f"{base}{gate_name}.weight", (F, H), f"expert {i}'s gate projection")
        w_gate_up[i, F:] = _get(state_dict, f"{base}{up_name}.weight", (F, H), f"expert {i}'s up projection")
        w_down[i] = _get(state_dict, f"{base}{down_name}.weight", (H, F), f"expert {i}'s down projection")
    return w_gate_up, w_down


def weights_from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MoEConfig, *, prefix: str = ""
) -> MoEWeights:
    """MoEWeights from the state dict of a Mixtral, Qwen3-MoE or DeepSeek-V3 MoE block.

    state_dict: keys relative to the block ("gate.weight", ...), or prefixed, e.g. a whole model's
      state dict with prefix="model.layers.3.mlp." (Mixtral checkpoints: "model.layers.3.block_sparse_moe.").
      Keys outside the prefix are ignored. Either layout of the module docstring, not a mix of the two.
    config: from config_from_hf (sizes, router, shared experts, dtype).
    Returns w_gate_up [E, 2F, H] and w_down [E, H, F] in config.dtype (the fused tensors themselves when
    their dtype matches; stacked into new tensors from the per-expert layout), router_weight [E, H] float32,
    score_correction_bias [E] float32 (grouped_topk), shared_gate_up [1, 2Fs, H] and shared_down [1, H, Fs]
    in config.dtype (with a shared expert).
    Raises ValueError naming the key and the expected shape for a missing key or a wrong shape, and for
    a mix of layouts, an expert index >= E, or shared-expert / correction-bias keys the config does not expect.
    """
    E, H, F = config.num_experts, config.hidden_size, config.ffn_size
    fused_keys = [k for k in (f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj") if k in state_dict]
    expert_keys = _expert_keys(state_dict, prefix)
    scales = [k for k in expert_keys if k.endswith(".weight_scale_inv")]
    if scales:
        raise ValueError(
            f"{scales[0]!r}: the experts are FP8 with block scales; load them with "
            "quantized_weights_from_hf_state_dict (their values mean nothing without the scales)"
        )
    if fused_keys and expert_keys:
        raise ValueError(
            f"state dict mixes the fused layout ({fused_keys[0]!r}) with the per-expert layout "
            f"({expert_keys[0]!r}): expected one of the two"
        )
    if expert_keys:
        w_gate_up, w_down = _stack_per_expert(state_dict, config, prefix, expert_keys)
    else:
        what = f"the fused gate and up projections (or per-expert keys {prefix}experts.{{i}}.*)"
        gate_up = _get(state_dict, f"{prefix}experts.gate_up_proj", (E, 2 * F, H), what)
        down = _get(state_dict, f"{prefix}experts.down_proj", (E, H, F), "the fused down projections")
        w_gate_up, w_down = gate_up.to(config.dtype), down.to(config.dtype)

    return MoEWeights(w_gate_up=w_gate_up, w_down=w_down, **_router_and_shared(state_dict, config, prefix))


def _expert_keys(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    per_expert = re.compile(re.escape(prefix) + r"experts\.\d+\.")
    return [k for k in state_dict if k.startswith(prefix) and per_expert.match(k)]


def _check_expert_indices(expert_keys: list[str], prefix: str, num_experts: int) -> None:
    index = re.compile(re.escape(prefix) + r"experts\.(\d+)\.")
    for key in expert_keys:
        if int(index.match(key).group(1)) >= num_experts:
            raise ValueError(
                f"unexpected key {key!r}: the config has num_experts={num_experts} (experts 0 .. {num_experts - 1})"
            )


def _router_and_shared(state_dict: Mapping[str, torch.Tensor], config: MoEConfig, prefix: str) -> dict:
    """The MoEWeights fields besides the routed experts: router_weight, score_correction_bias, shared experts."""
    E, H = config.num_experts, config.hidden_size
    router_weight = _get(state_dict, f"{prefix}gate.weight", (E, H), "the router weight").to(torch.float32)

    bias_key = f"{prefix}gate.e_score_correction_bias"
    score_correction_bias = None
    if config.router == "grouped_topk":
        score_correction_bias = _get(state_dict, bias_key, (E,), "the router's score correction bias")
        score_correction_bias = score_correction_bias.to(torch.float32)
    elif bias_key in state_dict:
        raise ValueError(f"unexpected key {bias_key!r}: router {config.router!r} takes no correction bias")

    # an HF block built with n_shared_experts=0 still holds a shared MLP of size 0: nothing to load
    shared_keys = [k for k, t in state_dict.items() if k.startswith(f"{prefix}shared_experts.") and t.numel()]
    shared_gate_up = shared_down = None
    S, Fs = config.num_shared_experts, config.shared_size
    if S > 1:
        raise ValueError(f"HF MoE blocks hold one shared MLP, the config has num_shared_experts={S}")
    if S == 1:
        base = f"{prefix}shared_experts."
        gate = _get(state_dict, f"{base}gate_proj.weight", (Fs, H), "the shared expert's gate projection")
        up = _get(state_dict, f"{base}up_proj.weight", (Fs, H), "the shared expert's up projection")
        down = _get(state_dict, f"{base}down_proj.weight", (H, Fs), "the shared expert's down projection")
        shared_gate_up = torch.cat([gate.to(config.dtype), up.to(config.dtype)])[None]
        shared_down = down.to(config.dtype)[None]
    elif shared_keys:
        raise ValueError(f"unexpected key {shared_keys[0]!r}: the config has num_shared_experts=0")

    return dict(
        router_weight=router_weight,
        score_correction_bias=score_correction_bias,
        shared_gate_up=shared_gate_up,
        shared_down=shared_down,
    )


def _fp8_projection(state_dict: Mapping[str, torch.Tensor], key: str, shape: tuple[int, int], what: str):
    """(values [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] float32) of one FP8 projection."""
    values = _get(state_dict, f"{key}.weight", shape, what)
    check_tensor(f"{key}.weight", values, dtypes=(FP8,))
    scale_key = f"{key}.weight_scale_inv"
    scale = _get(state_dict, scale_key, scale_shape((1, *shape), "block")[1:], f"{what}'s block scales")
    check_tensor(scale_key, scale, dtypes=(torch.float32,))
    return values, scale


def quantized_weights_from_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MoEConfig, *, prefix: str = ""
) -> QuantizedMoEWeights:
    """QuantizedMoEWeights ("block", 128) from a DeepSeek-V3-style FP8 MoE block: per-expert gate_proj / up_proj /
    down_proj .weight in float8_e4m3fn with .weight_scale_inv, stacked as they are (no dequantize round trip);
    the router and shared experts as weights_from_hf_state_dict reads them. F must be a multiple of 128, so the
    gate's and the up projection's blocks stay whole in w_gate_up [E, 2F, H]. Raises ValueError naming the key
    for a missing key, a wrong shape or dtype, or an expert index >= E."""
    E, H, F = config.num_experts, config.hidden_size, config.ffn_size
    if F % BLOCK_SIZE:
        raise ValueError(
            f"ffn_size ({F}) must be a multiple of the {BLOCK_SIZE}-row scale block: the gate's last block and the "
            "up projection's first would share one block of w_gate_up's rows"
        )
    expert_keys = _expert_keys(state_dict, prefix)
    _check_expert_indices(expert_keys, prefix, E)
    gate_up, gate_up_scale, down, down_scale = [], [], [], []
    for i in range(E):
        base = f"{prefix}experts.{i}."
        gate = _fp8_projection(state_dict, f"{base}gate_proj", (F, H), f"expert {i}'s gate projection")
        up = _fp8_projection(state_dict, f"{base}up_proj", (F, H), f"expert {i}'s up projection")
        values, scale = _fp8_projection(state_dict, f"{base}down_proj", (H, F), f"expert {i}'s down projection")
        gate_up.append(torch.cat([gate[0], up[0]]))
        gate_up_scale.append(torch.cat([gate[1], up[1]]))
        down.append(values)
        down_scale.append(scale)
    return QuantizedMoEWeights(
        QuantizedTensor(torch.stack(gate_up), torch.stack(gate_up_scale), "block"),
        QuantizedTensor(torch.stack(down), torch.stack(down_scale), "block"),
        **_router_and_shared(state_dict, config, prefix),
    )


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "config_from_hf",
    "quantized_weights_from_hf_state_dict",
    "weights_from_hf_state_dict",
]
