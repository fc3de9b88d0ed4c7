"""moekit.models: shapes, causality, seeded weights, argument checks, and the MoE blocks of DecoderMoE
against the oracle and across expert backends."""

from dataclasses import replace

import pytest
import torch

from moekit.models import MODELS, DecoderConfig, DecoderMoE, MoEBlock, TransformerDecoder, build_model
from moekit.reference import reference_moe
from moekit.testing import assert_close_to_reference, relative_error

TINY = DecoderConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, mlp_hidden_dim=48, moe_n_experts=4, moe_top_k=2)


def test_registry_holds_the_three_models_in_table_order():
    assert MODELS.names() == ["moe_layer", "transformer_decoder", "decoder_moe"]
    assert [MODELS.get(n).fn for n in MODELS.names()] == [MoEBlock, TransformerDecoder, DecoderMoE]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", MODELS.names())
def test_forward_shapes_and_dtype(name, dtype):
    model = build_model(name, replace(TINY, dtype=dtype), seed=1)
    (x,) = model.example_inputs(3, 7)
    with torch.inference_mode():
        out = model(x)
    width = TINY.d_model if name == "moe_layer" else TINY.vocab_size
    assert out.shape == (3, 7, width) and out.dtype == dtype
    assert torch.isfinite(out).all() and out.abs().max() > 0
    if name != "moe_layer":
        assert x.shape == (3, 7) and x.dtype == torch.int64


@pytest.mark.parametrize("name", ["transformer_decoder", "decoder_moe"])
def test_a_later_token_does_not_change_earlier_logits(name):
    model = build_model(name, TINY, seed=2)
    (ids,) = model.example_inputs(2, 12, seed=3)
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 1) % TINY.vocab_size
    with torch.inference_mode():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :7], before[:, :7])
    # the changed position and the ones after it see the new token
    assert (after[:, 7:] - before[:, 7:]).abs().amax(dim=-1).min() > 1e-3


def test_same_seed_same_weights_whatever_the_backend():
    a = build_model("decoder_moe", TINY, seed=5)
    b = build_model("decoder_moe", replace(TINY, expert_backend="masked_matmul"), seed=5)
    c = build_model("decoder_moe", TINY, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:  # norm gains start at one
            assert not torch.equal(pa, pc), name


def test_decoder_moe_blocks_match_the_oracle():
    """Each MoE layer inside the decoder, on the activations it actually sees, against reference_moe."""
    model = build_model("decoder_moe", TINY, seed=7)
    seen = []
    hooks = [
        block.ffn.moe.register_forward_hook(lambda layer, args, y: seen.append((layer, args[0], y)))
        for block in model.blocks
    ]
    with torch.inference_mode():
        model(*model.example_inputs(2, 16, seed=8))
    for hook in hooks:
        hook.remove()
    assert len(seen) == TINY.n_layers
    for layer, x, y in seen:
        assert x.shape == (32, TINY.d_model)
        ref = reference_moe(x, layer.weights, layer.config)
        assert len(ref.routing.topk_ids.unique()) == TINY.moe_n_experts  # every expert has work
        assert_close_to_reference(y, ref.y, torch.float32, "MoE block")


@pytest.mark.parametrize("backend", ["naive", "masked_matmul"])
def test_decoder_moe_backends_agree(backend):
    ids = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        grouped = build_model("decoder_moe", TINY, seed=10)(ids)
        other = build_model("decoder_moe", replace(TINY, expert_backend=backend), seed=10)(ids)
    assert relative_error(other, grouped) <= 2e-5


def test_decoder_moe_differs_from_the_dense_decoder():
    ids = torch.randint(0, TINY.vocab_size, (1, 5), generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        dense, moe = build_model("transformer_decoder", TINY)(ids), build_model("decoder_moe", TINY)(ids)
    assert relative_error(moe, dense) > 1e-2
    assert not any(isinstance(m, MoEBlock) for m in build_model("transformer_decoder", TINY).modules())


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"n_heads": 5}, ValueError, r"n_heads must divide d_model \(32\), got 5"),
        ({"vocab_size": 0}, ValueError, "vocab_size must be an int >= 1, got 0"),
        ({"n_layers": 1.5}, ValueError, "n_layers must be an int >= 1, got 1.5"),
        ({"mlp_hidden_dim": -1}, ValueError, "mlp_hidden_dim must be an int >= 1"),
        ({"moe_top_k": 5}, ValueError, r"moe_top_k must be <= moe_n_experts \(4\), got 5"),
        ({"router": "nope"}, ValueError, "router must be one of .*got 'nope'"),
        ({"expert_backend": "nope"}, ValueError, "expert_backend must be one of .*got 'nope'"),
        ({"dtype": torch.int32}, TypeError, "dtype must be a floating torch.dtype"),
    ],
)
def test_config_rejects_bad_arguments(change, error, message):
    with pytest.raises(error, match=message):
        replace(TINY, **change)


def test_models_check_their_inputs():
    decoder = build_model("transformer_decoder", TINY)
    with pytest.raises(TypeError, match="input_ids must have dtype in"):
        decoder(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"input_ids must be 2-D, got shape \(2, 3, 1\)"):
        decoder(torch.zeros(2, 3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 64\), got values in \[0, 64\]"):
        decoder(torch.tensor([[0, 64]]))
    block = build_model("moe_layer", TINY)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, \*, 32\), got \(2, 3, 31\)"):
        block(torch.randn(2, 3, 31))
    with pytest.raises(ValueError, match="unknown model 'nope'; expected one of"):
        build_model("nope", TINY)
    with pytest.raises(TypeError, match="config must be a DecoderConfig"):
        build_model("decoder_moe", {"vocab_size": 64})
