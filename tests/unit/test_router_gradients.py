"""Routers under autograd: the gradient flows through the top-k weights (the chosen probabilities, renormalised and
scaled), not through the discrete choice. Every router that trains and takes float64 passes torch.autograd.gradcheck
(finite differences too small to change a choice); softmax_topk's gradient equals its closed form, and fused_select's
(its Triton kernel's choice, softmax_topk's gradient) equals softmax_topk's; the DeepSeek-V3 correction bias, which
only selects, gets none."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import ROUTERS, MoEConfig, route

TRAINING = ROUTERS.training_names()
# fused_select's kernel takes no float64: test_fused_select_has_the_gradient_of_softmax_topk instead
IN_FLOAT64 = [name for name in TRAINING if ROUTERS.get(name).supports(torch.device("cpu"), torch.float64)[0]]


def config_for(router: str, E: int, K: int, renormalize: bool, scale: float) -> MoEConfig:
    extra = {"n_group": 2, "topk_group": 1} if router == "grouped_topk" else {}
    if router == "sinkhorn":
        extra = {"sinkhorn_iterations": 3}
    return MoEConfig(hidden_size=8, ffn_size=8, num_experts=E, top_k=K, router=router, renormalize=renormalize,
                     routed_scaling_factor=scale, **extra)  # fmt: skip


@pytest.mark.parametrize("router", IN_FLOAT64)
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
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 8, dtype=torch.float64, generator=g).requires_grad_()
    bias = (torch.randn(8, dtype=torch.float64, generator=g) * 0.1).requires_grad_()
    routing = route(logits, config, bias)
    # a random projection: the plain sum of renormalised weights is a constant, whose gradient is rounding noise
    (routing.topk_weights * torch.randn(routing.topk_weights.shape, dtype=torch.float64, generator=g)).sum().backward()
    assert bias.grad is None or not bool(bias.grad.any())
    assert logits.grad is not None and bool(logits.grad.any())


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_fused_select_has_the_gradient_of_softmax_topk(triton_device, K, renormalize):
    fused, torch_router = (config_for(name, 8, K, renormalize, 1.0) for name in ("fused_select", "softmax_topk"))
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(K)).to(triton_device) * 2
    g = torch.randn(9, K, generator=torch.Generator().manual_seed(K + 1)).to(triton_device)
    grads = []
    for config in (fused, torch_router):
        leaf = logits.clone().requires_grad_()
        routing = route(leaf, config)
        grads.append((routing.topk_ids, torch.autograd.grad(routing.topk_weights, leaf, g)[0]))
    (ids, got), (expected_ids, expected) = grads
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert "fused_select" in TRAINING


@pytest.mark.parametrize("router", TRAINING)
def test_every_training_router_has_its_float64_gradient_on_each_device(device, router):
    """A router's fast path on the device (grouped_topk's and fused_select's Triton kernels on CUDA) in float32
    against the torch ops in float64 on the same logits: the same choice, the same gradient. A kernel whose
    weights carry no gradient (grouped_topk's did: its router weight's gradient was zero on CUDA) fails."""
    from moekit.testing import assert_close_to_reference

    ok, reason = ROUTERS.get(router).supports(device, torch.float32)
    if not ok:
        pytest.skip(reason)
    config = config_for(router, 8, 3, True, 2.5)
    twin = config_for("softmax_topk" if router == "fused_select" else router, 8, 3, True, 2.5)
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(7)) * 2
    g = torch.randn(9, 3, generator=torch.Generator().manual_seed(8))
    fast, slow = logits.to(device).requires_grad_(), logits.double().requires_grad_()
    got, expected = route(fast, config), route(slow, twin)
    assert torch.equal(got.topk_ids.cpu(), expected.topk_ids.cpu()), f"{router} chose other experts"
    got_grad = torch.autograd.grad(got.topk_weights, fast, g.to(device))[0]
    expected_grad = torch.autograd.grad(expected.topk_weights, slow, g.double())[0]
    assert_close_to_reference(got_grad.cpu(), expected_grad, torch.float32, f"{router} on {device}: d logits")
