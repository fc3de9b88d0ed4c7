import pytest
import torch

from moekit import MoEConfig
from moekit.routing import ROUTERS

GOOD = dict(hidden_size=8, ffn_size=8, num_experts=4, top_k=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(top_k=5), r"top_k must be <= num_experts \(4\)"),
        (dict(top_k=0), "top_k must be an int >= 1"),
        (dict(num_experts=0, top_k=1), "num_experts must be an int >= 1"),
        (dict(hidden_size=2.5), "hidden_size must be an int >= 1"),
        (dict(ffn_size=True), "ffn_size must be an int >= 1"),
        (dict(router="nope"), "router must be one of"),
        (dict(n_group=3), r"n_group must divide num_experts \(4\)"),
        (dict(n_group=2, topk_group=3), r"topk_group must be <= n_group \(2\)"),
        (dict(n_group=4, topk_group=1), r"top_k \(2\) must be <= topk_group \* experts per group"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be > 0"),
        (dict(sinkhorn_temperature=-1.0), "sinkhorn_temperature must be > 0"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0 or None"),
        (dict(dtype=torch.int32), "dtype must be a floating torch.dtype"),
        (dict(num_shared_experts=-1), "num_shared_experts must be an int >= 0"),
    ],
)
def test_bad_config_names_the_argument(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MoEConfig(**{**GOOD, **change})


def test_every_registered_router_is_a_valid_config():
    for name in ROUTERS.names():
        assert MoEConfig(**GOOD, router=name).router == name


def test_capacity_rounds_up():
    config = MoEConfig(**GOOD, capacity_factor=1.25)
    assert config.expert_capacity(10) == 7  # ceil(1.25 * 10 * 2 / 4)
    assert MoEConfig(**GOOD).expert_capacity(10) is None
