"""The padded_triton dispatcher on one rank (the put kernel is a local copy there, no all_reduce): the same
rows, metadata, handle and combine as padded, bit for bit, over steps whose M changes (0 and the capacity
too), with its kernel shown to have run. Several ranks need CUDA symmetric memory and a process group:
tests/distributed/test_gpu_dispatchers.py; the kernel on simulated groups: test_fixed_messages.py.
"""

from __future__ import annotations

import pytest
import torch

from moekit.ep import DISPATCHERS
from moekit.ep.padded import PaddedDispatcher
from moekit.ep.padded_triton import PaddedTritonDispatcher
from moekit.kernels.availability import triton_support
from moekit.testing.capacity_edges import routing_at_capacity
from moekit.testing.numerics import assert_close_to_reference
from moekit.testing.simulated_heap import SimulatedGroup

H, E, K, MAX_TOKENS = 16, 4, 2, 10


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=str)
def dtype(request, skip_unless_triton_runs):
    skip_unless_triton_runs(request.param)
    return request.param


@pytest.mark.parametrize("capacity", [None, MAX_TOKENS])
def test_one_rank_equals_padded(device, dtype, capacity):
    g = torch.Generator().manual_seed(3)
    heap = SimulatedGroup(1, device).rank(0)
    triton_path = PaddedTritonDispatcher(None, E, H, MAX_TOKENS, dtype, device, capacity=capacity, heap=heap)
    padded = PaddedDispatcher(None, E, H, MAX_TOKENS, dtype, device, capacity=capacity)
    moved = 0  # steps whose rows went through the put kernel: all but those with M = 0
    for T in [MAX_TOKENS, 0, 3, MAX_TOKENS]:
        moved += T > 0 or capacity is not None
        x = torch.randn(T, H, generator=g).to(device, dtype)
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].to(device)
        w = torch.rand(T, K, generator=g).to(device)
        shared = torch.randn(T, H, generator=g).to(device, dtype)
        (got_x, got_meta, got_handle), (want_x, want_meta, want_handle) = (
            d.dispatch(x, ids, w) for d in (triton_path, padded)
        )
        assert torch.equal(got_x, want_x) and got_handle.slots_per_peer == want_handle.slots_per_peer
        for name in ("local_expert_counts", "local_expert_offsets", "src_rank", "src_token", "weight"):
            assert torch.equal(getattr(got_meta, name), getattr(want_meta, name)), name
        assert got_handle.padding_fraction == want_handle.padding_fraction
        out = (got_x * 3).to(dtype)
        assert torch.equal(triton_path.combine(out, got_handle, shared), padded.combine(out, want_handle, shared))
        assert triton_path._epochs == [moved, moved], "the put kernel ran (dispatch and combine) when M > 0"


def test_fixed_capacity_holds_exactly_capacity_and_refuses_one_token_more(device, dtype):
    """capacity C: C tokens to one rank move (M = C) and combine as padded does; C + 1 raise before any put."""
    C = 3
    heap = SimulatedGroup(1, device).rank(0)
    d = PaddedTritonDispatcher(None, E, H, MAX_TOKENS, dtype, device, capacity=C, heap=heap)
    (ids, w), = routing_at_capacity(1, E, K, C)
    x = torch.randn(C, H).to(device, dtype)
    recv_x, meta, handle = d.dispatch(x, ids.to(device), w.to(device))
    assert handle.slots_per_peer == C and torch.equal(meta.local_expert_counts.cpu(), torch.tensor([C, C, 0, 0]))
    y = d.combine(recv_x, handle)
    assert_close_to_reference(y.cpu(), w.sum(1, dtype=torch.float64)[:, None] * x.cpu().double(), dtype, "combine")
    (ids, w), = routing_at_capacity(1, E, K, C, over_rank=0)
    with pytest.raises(ValueError, match=f"rank 0 would send {C + 1} tokens to rank 0, above the fixed capacity {C}"):
        d.dispatch(torch.randn(C + 1, H).to(device, dtype), ids.to(device), w.to(device))
    assert d._epochs == [1, 1], "nothing was put for the refused step"


def test_errors_and_where_it_runs(device):
    ok, reason = triton_support(device, torch.float32)
    if not ok:
        pytest.skip(reason)
    d = PaddedTritonDispatcher(None, E, H, MAX_TOKENS, torch.float32, device, heap=SimulatedGroup(1, device).rank(0))
    x, w = torch.randn(2, H, device=device), torch.ones(2, K, device=device)
    d.dispatch(x, torch.tensor([[0, 1], [2, 3]], device=device), w)
    with pytest.raises(ValueError, match="topk_ids has 1 columns.*set up for top_k=2"):
        d.dispatch(x, torch.tensor([[0], [2]], device=device), w[:, :1])
    ok, reason = DISPATCHERS.get("padded_triton").fn.supports(2, "cpu")
    assert not ok and "CUDA" in reason
    with pytest.raises(ValueError, match="padded_triton.*cannot run on 1 cpu ranks"):
        PaddedTritonDispatcher(None, E, H, MAX_TOKENS, torch.float32, "cpu")
