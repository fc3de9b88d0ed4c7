"""MoELayer on one device against the oracle, for every router x expert backend that runs here."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit import EXPERT_BACKENDS, ROUTERS, MoEConfig
from moekit.layer import MoELayer
from moekit.reference import reference_moe
from moekit.testing import assert_close_to_reference
from moekit.testing.strategies import moe_cases


@pytest.fixture
def runnable_pair(router, backend, device):
    """(router, backend), or a skip saying why they cannot run here in float32: at setup, before Hypothesis
    runs an example (a skip inside one reads 'Failing explicit example' in the log)."""
    for impl in (ROUTERS.get(router), EXPERT_BACKENDS.get(backend)):
        ok, reason = impl.supports(device, torch.float32)
        if not ok:
            pytest.skip(reason)
    if backend == "compiled":
        pytest.skip("compiled recompiles per drawn shape; held to fixed shapes in test_experts")
    return router, backend


@pytest.mark.parametrize("backend", EXPERT_BACKENDS.names())
@pytest.mark.parametrize("router", ROUTERS.names())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=8)  # runnable_pair only skips
@given(data=st.data())
def test_layer_matches_oracle(runnable_pair, device, data):
    router, backend = runnable_pair
    dtype = torch.float32
    multiple = EXPERT_BACKENDS.get(backend).size_multiple(dtype)
    case = data.draw(moe_cases(routers=(router,), dtypes=(dtype,), min_hidden=8, size_multiple=multiple))
    problem = case.problem(device)
    layer = MoELayer(problem.config, backend=backend, weights=problem.weights, device=device)
    y = layer(problem.x)
    assert y.shape == problem.x.shape and y.dtype == dtype
    assert_close_to_reference(y, reference_moe(problem.x, problem.weights, problem.config).y, dtype, "layer")


def test_layer_holds_its_weights_as_parameters_and_checks_input():
    config = MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=2, num_shared_experts=1, dtype=torch.float32)
    layer = MoELayer(config)
    names = {name for name, _ in layer.named_parameters()}
    assert {"w_gate_up", "w_down", "router_weight", "shared_gate_up", "shared_down"} <= names
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 16\)"):
        layer(torch.randn(3, 15))
    with pytest.raises(TypeError, match="x must have dtype in"):
        layer(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown expert backend 'nope'"):
        MoELayer(config, backend="nope")


def test_layer_refuses_a_backend_its_dispatcher_cannot_feed_when_built():
    """The fixed-shape dispatcher's padded rows need triton_grouped, and own_first cannot run on it: the
    constructor says so, before any dispatcher, buffer or collective exists (here on a CPU, where that
    dispatcher could not even be made)."""
    config = MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="only expert backend 'triton_grouped'.*got 'grouped_mm'"):
        MoELayer(config, backend="grouped_mm", dispatcher="nvshmem_triton_graph")
    with pytest.raises(ValueError, match="own_first"):
        MoELayer(config, backend="triton_grouped", dispatcher="nvshmem_triton_graph", own_first=True)


FLOAT64_CPU_BACKENDS = [i.name for i in EXPERT_BACKENDS if i.supports(torch.device("cpu"), torch.float64)[0]]


@pytest.mark.parametrize("backend", FLOAT64_CPU_BACKENDS)
def test_float64_layer_through_a_dispatcher_is_float64_exact(backend):
    """A float64 layer equals the oracle to float64's tolerance with the one-rank dispatcher too: the router
    weights ride the dispatch as float64 (a float32 hop moved the output by ~2e-8)."""
    config = MoEConfig(hidden_size=32, ffn_size=16, num_experts=12, top_k=3, num_shared_experts=1, dtype=torch.float64)
    layer = MoELayer(config, backend=backend, dispatcher="skip_a2a", max_tokens=64, seed=0)
    x = torch.randn(40, 32, dtype=torch.float64)
    expected = reference_moe(x, layer.weights, config).y
    assert_close_to_reference(layer(x), expected, torch.float64, f"float64 layer on skip_a2a with {backend}")
