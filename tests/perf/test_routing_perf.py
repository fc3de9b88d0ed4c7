"""Routers against the naive softmax_topk, and the expert layout against a per-expert loop."""

from dataclasses import replace

import pytest
import torch

from moekit import MoEConfig, route
from moekit.permute import expert_layout
from moekit.routing import ROUTERS

from sizes import DTYPE, ROUTER_EXPERTS, ROUTER_TOKENS, ROUTER_TOPK

pytestmark = pytest.mark.perf

CONFIG = MoEConfig(
    hidden_size=16, ffn_size=16, num_experts=ROUTER_EXPERTS, top_k=ROUTER_TOPK, n_group=8, topk_group=4, dtype=DTYPE
)


def _logits(device):
    return torch.randn(ROUTER_TOKENS, ROUTER_EXPERTS, device=device)


@pytest.mark.benchmark(group="routers")
@pytest.mark.parametrize("router", [n for n in ROUTERS.names() if n != "softmax_topk"])
def test_router(router, perf, perf_device):
    ok, reason = ROUTERS.get(router).supports(perf_device, torch.float32)
    if not ok:
        pytest.skip(reason)
    logits = _logits(perf_device)
    config = replace(CONFIG, router=router)
    bias = torch.randn(ROUTER_EXPERTS, device=perf_device) * 0.1 if router == "grouped_topk" else None
    io_bytes = logits.nbytes + ROUTER_TOKENS * ROUTER_TOPK * 8
    perf(
        lambda: route(logits, config, bias, check_values=False),
        lambda: route(logits, CONFIG, check_values=False),
        reference_name="softmax_topk",
        bytes_moved=io_bytes,
        graphs=True,  # a few small kernels each: eager, the lease's host CPU would set the pace
    )


@pytest.mark.benchmark(group="routers")
def test_grouped_topk_kernel(perf, perf_device):
    """DeepSeek-V3's router on CUDA (one Triton kernel) against its torch ops, which define it."""
    from moekit.routing.grouped_topk import grouped_topk_torch

    if perf_device.type != "cuda":
        pytest.skip("grouped_topk runs its torch ops off CUDA: nothing to compare")
    logits = _logits(perf_device)
    config = replace(CONFIG, router="grouped_topk")
    bias = torch.randn(ROUTER_EXPERTS, device=perf_device) * 0.1
    perf(
        lambda: route(logits, config, bias, check_values=False),
        lambda: grouped_topk_torch(logits, config, bias),
        reference_name="grouped_topk torch ops",
        bytes_moved=logits.nbytes + ROUTER_TOKENS * ROUTER_TOPK * 8,
        graphs=True,
    )


def per_expert_loop_layout(topk_ids, num_experts):
    """The obvious layout: for each expert, the (token, slot) pairs that chose it."""
    flat = topk_ids.flatten()
    rows = [torch.nonzero(flat == e).flatten() for e in range(num_experts)]
    counts = torch.stack([torch.tensor(r.numel(), device=flat.device) for r in rows])
    return torch.cat(rows), counts


@pytest.mark.benchmark(group="permute")
def test_expert_layout(perf, perf_device):
    ids = route(_logits(perf_device), CONFIG).topk_ids
    io_bytes = ids.nbytes + ids.numel() * 8 * 3
    perf(
        lambda: expert_layout(ids, ROUTER_EXPERTS),
        lambda: per_expert_loop_layout(ids, ROUTER_EXPERTS),
        reference_name="per_expert_loop",
        bytes_moved=io_bytes,
        host_bound=True,  # the loop's nonzero per expert waits on the host
    )
