"""The nvshmem_triton dispatcher: its Triton kernels store into every rank's symmetric buffers.

Simulated groups: one process plays W ranks over one heap (moekit.testing.simulated_heap), every rank's
dispatch_async before any rank's dispatch_wait (the waits spin until signalled): on the CPU under
TRITON_INTERPRET=1, on one GPU with the kernels compiled. Each step checks, on every rank,
  - the received rows, their local expert grouping, src_rank, src_token and weight against who should
    receive what (computed here from the routing), each token once per destination rank;
  - combine of expert_out = (1 + local expert) * recv_x: sum_k w_k (1 + e_k mod E_local) x (+ shared_out);
over several steps with other sizes (the buffer ring turns, stale rows must not leak).
Real ranks on GPUs: tests/distributed/test_gpu_dispatchers.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.dist import DISPATCHERS
from moekit.dist.nvshmem_triton import RING, NvshmemTritonDispatcher
from moekit.kernels.availability import triton_support
from moekit.testing.numerics import assert_close_to_reference
from moekit.testing.simulated_heap import SimulatedGroup

H = 24
MAX_TOKENS = 12


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=str)
def dtype(request, device):
    ok, reason = triton_support(device, request.param)
    if not ok:
        pytest.skip(reason)
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under TRITON_INTERPRET=1 a CUDA run is the CPU run with copies; the GPU run compiles")
    return request.param


def routing_for(T, E, K, skew_to, g):
    scores = torch.rand(T, E, generator=g)
    if skew_to is not None:
        scores[:, skew_to] += 2.0  # every token picks this expert
    ids = scores.argsort(dim=1, descending=True)[:, :K].to(torch.int32)
    return ids, torch.rand(T, K, generator=g) + 0.1


def expected_rows(q, W, E_local, tokens, ids):
    """(local expert, src rank, src token, k) of every row rank q must receive, in the documented order."""
    rows = []
    for p in range(W):
        for t in range(tokens[p]):
            for k, g in enumerate(ids[p][t].tolist()):
                if g // E_local == q:
                    rows.append((g % E_local, p, t, k))
    return sorted(rows, key=lambda r: (r[0], r[1], r[2]))


def run_step(dispatchers, device, dtype, E, K, tokens, skew_to, with_shared, g):
    W, E_local = len(dispatchers), E // len(dispatchers)
    xs = [torch.randn(T, H, generator=g).to(device, dtype) for T in tokens]
    routings = [routing_for(T, E, K, skew_to, g) for T in tokens]
    ids = [r[0] for r in routings]
    pendings = [d.dispatch_async(x, i.to(device), w.to(device)) for d, x, (i, w) in zip(dispatchers, xs, routings)]
    received = [d.dispatch_wait(p) for d, p in zip(dispatchers, pendings)]
    for q, (recv_x, meta, handle) in enumerate(received):
        want = expected_rows(q, W, E_local, tokens, ids)
        got_expert = torch.repeat_interleave(torch.arange(E_local), meta.local_expert_counts.cpu())
        got = list(zip(got_expert.tolist(), meta.src_rank.tolist(), meta.src_token.tolist()))
        assert got == [r[:3] for r in want], f"rank {q}: rows or their order"
        for i, (_, p, t, k) in enumerate(want):
            assert torch.equal(recv_x[i].cpu(), xs[p][t].cpu())
            assert meta.weight[i].item() == routings[p][1][t, k].item()
        senders = sum(1 for p in range(W) for t in range(tokens[p]) if (ids[p][t] // E_local == q).any())
        assert int(handle.recv_counts.sum()) == senders, "each token once per destination rank"
    shared = [torch.randn(T, H, generator=g).to(device, dtype) if with_shared else None for T in tokens]
    combines = []
    for d, (recv_x, meta, handle), s in zip(dispatchers, received, shared):
        scale = 1 + torch.repeat_interleave(torch.arange(E_local, device=device), meta.local_expert_counts)
        out = torch.full_like(recv_x, float("nan"))  # poisoned, then every row written
        out[:] = recv_x * scale[:, None].to(dtype)
        combines.append(d.combine_async(out, handle, s))
    for p, (d, pending) in enumerate(zip(dispatchers, combines)):
        y = d.combine_wait(pending)
        factor = (routings[p][1] * (1 + ids[p].long() % E_local)).sum(1, dtype=torch.float64)
        ref = factor[:, None] * xs[p].cpu().double()
        if shared[p] is not None:
            ref += shared[p].cpu().double()
        assert y.dtype == dtype and y.shape == (tokens[p], H)
        assert_close_to_reference(y.cpu(), ref, dtype, f"rank {p} combine")


@st.composite
def scenarios(draw):
    W = draw(st.integers(1, 4))
    E = W * draw(st.integers(1, 3))
    K = draw(st.integers(1, E))
    steps = [
        (
            [draw(st.sampled_from([0, 1, MAX_TOKENS]) | st.integers(0, MAX_TOKENS)) for _ in range(W)],
            draw(st.none() | st.integers(0, E - 1)),
            draw(st.booleans()),
        )
        for _ in range(RING + 1)
    ]
    return W, E, K, steps, draw(st.integers(1, 4)), draw(st.integers(0, 2**31 - 1))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=12)
@given(case=scenarios())
def test_simulated_group_dispatch_combine(device, dtype, case):
    W, E, K, steps, tokens_per_program, seed = case
    g = torch.Generator().manual_seed(seed)
    group = SimulatedGroup(W, device)
    dispatchers = [
        NvshmemTritonDispatcher(
            None, E, H, MAX_TOKENS, dtype, device, heap=group.rank(p), tokens_per_program=tokens_per_program
        )
        for p in range(W)
    ]
    for tokens, skew_to, with_shared in steps:  # more steps than the ring has buffers
        run_step(dispatchers, device, dtype, E, K, tokens, skew_to, with_shared, g)


def test_fixed_edge_cases(device, dtype):
    """K = E, all tokens on one expert, a rank with no tokens, odd sizes: one step each on 3 ranks."""
    g = torch.Generator().manual_seed(7)
    for E, K, tokens, skew_to in [(3, 3, [5, 0, 7], None), (6, 2, [MAX_TOKENS, 3, 1], 4), (3, 1, [0, 0, 0], None)]:
        group = SimulatedGroup(3, device)
        dispatchers = [
            NvshmemTritonDispatcher(None, E, H, MAX_TOKENS, dtype, device, heap=group.rank(p)) for p in range(3)
        ]
        run_step(dispatchers, device, dtype, E, K, tokens, skew_to, True, g)


def test_errors(device, dtype):
    group = SimulatedGroup(2, device)
    d0, d1 = (NvshmemTritonDispatcher(None, 4, H, MAX_TOKENS, dtype, device, heap=group.rank(p)) for p in range(2))
    x = torch.randn(3, H, device=device).to(dtype)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]], device=device)
    w = torch.ones(3, 2, device=device)
    d0.dispatch_async(x, ids, w)
    with pytest.raises(ValueError, match="set up for top_k=2"):
        d0.dispatch_async(x, ids[:, :1], w[:, :1])
    with pytest.raises(ValueError, match="above max_tokens=12"):
        d1.dispatch_async(torch.zeros(13, H, device=device, dtype=dtype), ids[[0] * 13], w[[0] * 13])
    with pytest.raises(ValueError, match="num_experts .5. must be divisible by the world size .2."):
        NvshmemTritonDispatcher(None, 5, H, MAX_TOKENS, dtype, device, heap=SimulatedGroup(2, device).rank(0))


def test_registry_knows_where_it_runs():
    assert "nvshmem_triton" in DISPATCHERS.names()
    ok, reason = DISPATCHERS.get("nvshmem_triton").fn.supports(2, "cpu")
    assert not ok and "CUDA" in reason
    with pytest.raises(ValueError, match="nvshmem_triton.*cannot run on 1 cpu ranks"):
        NvshmemTritonDispatcher(None, 4, H, MAX_TOKENS, torch.float32, "cpu")
