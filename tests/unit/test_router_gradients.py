"""Routers under autograd: the gradient flows through the top-k weights (the chosen probabilities, renormalised and
scaled), not through the discrete choice. Every router registered with trains=True passes torch.autograd.gradcheck
in float64 (finite differences too small to change a choice); softmax_topk's gradient equals its closed form; the
DeepSeek-V3 correction bias, which only selects, gets none; a router without backward says so."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import ROUTERS, MoEConfig, route

TRAINING = ROUTERS.training_names()


def config_for(router: str, E: int, K: int, renormalize: bool, scale: float) -> MoEConfig:
    extra = {"n_group": 2, "topk_group": 1} if router == "grouped_topk" else {}
    if router == "sinkhorn":
        extra = {"sinkhorn_iterations": 3}
    return MoEConfig(hidden_size=8, ffn_size=8, num_experts=E, top_k=K, router=router, renormalize=renormalize,
                     routed_scaling_factor=scale, **extra)  # fmt: skip


@pytest.mark.parametrize("router", TRAINING)
@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 6), half_E=st.integers(1, 4), data=st.data(), renormalize=st.booleans(),
       scale=st.sampled_from([1.0, 2.5]), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_router_weights_pass_gradcheck(router, T, half_E, data, renormalize, scale, seed):
    E = 2 * half_E  # grouped_topk's two groups
    K = data.draw(st.integers(1, E // 2 if router == "grouped_topk" else E))  # K = E included
    config = config_for(router, E, K, renormalize, scale)
    logits = torch.randn(T, E, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    assert torch.autograd.gradcheck(lambda lg: route(lg, config).topk_weights, (logits,))


def test_softmax_topk_gradient_is_its_closed_form():
    """w_k = p_{i_k} with p = softmax(l): dw_k / dl_j = p_{i_k} (delta_{i_k j} - p_j)."""
    config = config_for("softmax_topk", 6, 3, False, 1.0)
    logits = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    routing = route(logits, config)
    g = torch.randn(routing.topk_weights.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (grad,) = torch.autograd.grad(routing.topk_weights, logits, g)
    p = torch.softmax(logits.detach(), dim=-1)
    expected = torch.zeros_like(p)
    for t in range(4):
        for k, i in enumerate(routing.topk_ids[t].tolist()):
            expected[t] += g[t, k] * p[t, i] * (torch.eye(6, dtype=torch.float64)[i] - p[t])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_the_correction_bias_gets_no_gradient():
    config = MoEConfig(hidden_size=8, ffn_size=8, num_experts=8, top_k=2, router="grouped_topk", n_group=2,
                       topk_group=1, renormalize=True)  # fmt: skip
    logits = torch.randn(5, 8, dtype=torch.float64).requires_grad_()
    bias = (torch.randn(8, dtype=torch.float64) * 0.1).requires_grad_()
    routing = route(logits, config, bias)
    routing.topk_weights.sum().backward()
    assert bias.grad is None or not bool(bias.grad.any())
    assert logits.grad is not None and bool(logits.grad.any())


def test_a_router_without_backward_refuses_grad_requiring_logits():
    impl = ROUTERS.get("fused_select")
    config = config_for("fused_select", 8, 2, True, 1.0)
    with pytest.raises(ValueError, match=rf"router 'fused_select' has no backward.*{TRAINING[0]}"):
        impl.fn(torch.randn(3, 8).requires_grad_(), config, None)
    assert "fused_select" not in TRAINING and {"softmax_topk", "grouped_topk"} <= set(TRAINING)
