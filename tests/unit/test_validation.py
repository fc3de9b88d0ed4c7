"""trusted_values(): the value checks that wait for the device are skipped inside it and only there, and a
MoELayer built with check_values=False forwards NaN input without its one host synchronisation."""

import pytest
import torch

from moekit import MoEConfig
from moekit.layer import MoELayer
from moekit.validation import check_finite, check_routing, trusted_values


def _routing(num_tokens: int = 5, top_k: int = 2, num_experts: int = 4):
    ids = torch.randint(0, num_experts, (num_tokens, top_k))
    return ids, torch.rand(num_tokens, top_k)


def test_out_of_range_ids_are_caught_outside_trusted_values_only():
    ids, weights = _routing()
    ids[3, 1] = 4
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 4\)"):
        check_routing(ids, weights, 4)
    with trusted_values():
        check_routing(ids, weights, 4)  # trusted: no device wait, no check
    with pytest.raises(ValueError, match="topk_ids"):
        check_routing(ids, weights, 4)  # restored on leaving


def test_trust_ends_when_the_block_raises():
    nan = torch.tensor([1.0, float("nan")])
    with pytest.raises(RuntimeError, match="inside"):
        with trusted_values():
            check_finite("x", nan)
            raise RuntimeError("inside")
    with pytest.raises(ValueError, match="x must be finite"):
        check_finite("x", nan)


def test_shape_checks_still_run_inside_trusted_values():
    ids, weights = _routing()
    with trusted_values(), pytest.raises(ValueError, match="topk_weights must have shape"):
        check_routing(ids, weights[:, :1], 4)


@pytest.mark.parametrize("check_values", [True, False])
def test_layer_nan_check_follows_check_values(check_values):
    config = MoEConfig(hidden_size=32, ffn_size=48, num_experts=4, top_k=2, dtype=torch.float32)
    layer = MoELayer(config, backend="grouped_loop", check_values=check_values)
    x = torch.randn(6, 32)
    x[2, 5] = float("nan")
    if check_values:
        with pytest.raises(ValueError, match="logits must be finite"):
            layer(x)
    else:
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
