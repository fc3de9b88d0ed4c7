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

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.ep import DISPATCHERS
from moekit.ep.nvshmem_triton import RING, NvshmemTritonDispatcher, NvshmemTritonGraphDispatcher
from moekit.testing.numerics import assert_close_to_reference
from moekit.testing.simulated_heap import SimulatedGroup

H = 24
MAX_TOKENS = 12


@pytest.fixture(params=["nvshmem_triton", "nvshmem_triton_graph"])
def dispatcher_cls(request):
    return DISPATCHERS.get(request.param).fn


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=str)
def dtype(request, skip_unless_triton_runs):
    skip_unless_triton_runs(request.param)
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


def send_step(dispatchers, device, dtype, E, K, tokens, skew_to, with_shared, g):
    """Draw one step's inputs, dispatch on every rank; (inputs, what each rank received)."""
    xs = [torch.randn(T, H, generator=g).to(device, dtype) for T in tokens]
    routings = [routing_for(T, E, K, skew_to, g) for T in tokens]
    shared = [torch.randn(T, H, generator=g).to(device, dtype) if with_shared else None for T in tokens]
    ids, ws = ([r[i].to(device) for r in routings] for i in (0, 1))
    return (xs, routings, shared), dispatch_step(dispatchers, xs, ids, ws)


def dispatch_step(dispatchers, xs, ids, ws):
    """Every rank's dispatch_async, then every rank's dispatch_wait (the waits spin until signalled)."""
    pendings = [d.dispatch_async(x, i, w) for d, x, i, w in zip(dispatchers, xs, ids, ws)]
    return [d.dispatch_wait(p) for d, p in zip(dispatchers, pendings)]


def combine_step(dispatchers, received, shared):
    """Every rank combines expert_out = (1 + local expert) * recv_x (padding rows poisoned with NaN)."""
    pendings = []
    for d, (recv_x, meta, handle), s in zip(dispatchers, received, shared):
        E_local = d.num_local_experts
        R = meta.local_expert_counts.sum()  # a tensor: no host sync, so a graph can capture this
        expert = torch.searchsorted(
            meta.local_expert_offsets[1:], torch.arange(recv_x.shape[0], device=R.device), right=True
        )
        scale = (1 + expert.clamp(max=E_local - 1)).to(recv_x.dtype)
        padding = torch.arange(recv_x.shape[0], device=R.device) >= R
        out = torch.where(padding[:, None], float("nan"), recv_x * scale[:, None])
        pendings.append(d.combine_async(out, handle, s))
    return [d.combine_wait(p) for d, p in zip(dispatchers, pendings)]


def check_received(dispatchers, tokens, inputs, received):
    xs, routings, _ = inputs
    W, E_local, K = len(dispatchers), dispatchers[0].num_local_experts, routings[0][0].shape[1]
    ids = [r[0] for r in routings]
    for q, (d, (recv_x, meta, handle)) in enumerate(zip(dispatchers, received)):
        want = expected_rows(q, W, E_local, tokens, ids)
        R = int(meta.local_expert_offsets[-1])
        bound = W * MAX_TOKENS * min(K, E_local) if d.fixed_shapes else R
        assert R == len(want) and recv_x.shape[0] == meta.num_rows == handle.num_rows == bound
        got_expert = torch.repeat_interleave(torch.arange(E_local), meta.local_expert_counts.cpu())
        got = list(zip(got_expert.tolist(), meta.src_rank[:R].tolist(), meta.src_token[:R].tolist()))
        assert got == [r[:3] for r in want], f"rank {q}: rows or their order"
        for i, (_, p, t, k) in enumerate(want):
            assert torch.equal(recv_x[i].cpu(), xs[p][t].cpu())
            assert meta.weight[i].item() == routings[p][1][t, k].item()
        assert (meta.src_rank[R:] == -1).all() and (meta.src_token[R:] == -1).all() and (meta.weight[R:] == 0).all()
        senders = sum(1 for p in range(W) for t in range(tokens[p]) if (ids[p][t] // E_local == q).any())
        assert int(handle.recv_counts.sum()) == senders, "each token once per destination rank"


def check_combined(dispatchers, inputs, ys):
    xs, routings, shared = inputs
    E_local = dispatchers[0].num_local_experts
    for p, y in enumerate(ys):
        factor = (routings[p][1] * (1 + routings[p][0].long() % E_local)).sum(1, dtype=torch.float64)
        ref = factor[:, None] * xs[p].cpu().double()
        if shared[p] is not None:
            ref += shared[p].cpu().double()
        assert y.dtype == xs[p].dtype and y.shape == xs[p].shape
        assert_close_to_reference(y.cpu(), ref, xs[p].dtype, f"rank {p} combine")


def run_step(dispatchers, device, dtype, E, K, tokens, skew_to, with_shared, g):
    inputs, received = send_step(dispatchers, device, dtype, E, K, tokens, skew_to, with_shared, g)
    check_received(dispatchers, tokens, inputs, received)
    check_combined(dispatchers, inputs, combine_step(dispatchers, received, inputs[2]))


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


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=6, deadline=None)
@given(
    W=st.integers(1, 4),
    E_local=st.integers(1, 40),
    K=st.integers(1, 9),
    T=st.lists(st.integers(0, 300), min_size=2, max_size=2),
    tokens_per_program=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 99),
)
def test_send_plan_matches_torch(triton_device, W, E_local, K, T, tokens_per_program, seed):
    """The send kernels' plan (token blocks counted in parallel, their first rows scanned; up to 300 blocks)
    equals the torch plan on every rank, two steps in a row (the counts are rearmed): dest_pos, each token's
    row among the tokens sent to rank q, and the counts rank q's flags carry (tokens, pairs per local expert)."""
    from moekit.ep.base import plan_sends

    device = triton_device  # float32: the skip comes at setup, before Hypothesis runs an example
    E, K, H_small = W * E_local, min(K, W * E_local), 4
    g = torch.Generator().manual_seed(seed)
    group = SimulatedGroup(W, device)
    dispatchers = [
        NvshmemTritonDispatcher(None, E, H_small, 300, torch.float32, device, heap=group.rank(p),
                                tokens_per_program=tokens_per_program)
        for p in range(W)
    ]  # fmt: skip
    for T_step in T:
        ids = [routing_for(T_step, E, K, None, g) for _ in range(W)]
        pendings = [
            d.dispatch_async(torch.randn(T_step, H_small).to(device), i.to(device), w.to(device))
            for d, (i, w) in zip(dispatchers, ids)
        ]
        for p, (pending, (i, _)) in enumerate(zip(pendings, ids)):
            plan = plan_sends(i, E_local, W)
            want = torch.full((T_step, W), -1, dtype=torch.int32)
            starts = torch.cat([plan.send_counts.new_zeros(1), plan.send_counts.cumsum(0)[:-1]])
            want[plan.send_token_idx, plan.send_dest] = (
                torch.arange(len(plan.send_dest)) - starts[plan.send_dest]
            ).int()
            assert torch.equal(pending.dest_pos.cpu(), want), f"rank {p} dest_pos"
            pairs = torch.bincount(i.reshape(-1).long(), minlength=E).view(W, E_local)
            for q, d in enumerate(dispatchers):
                flags = d._flags[0][int(d._signals[0].epoch) % RING, p].cpu()
                assert torch.equal(flags[1:], torch.cat([plan.send_counts[q : q + 1], pairs[q]]).int()), f"{p} -> {q}"


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=12)
@given(case=scenarios())
def test_simulated_group_dispatch_combine(device, dtype, dispatcher_cls, case):
    W, E, K, steps, tokens_per_program, seed = case
    g = torch.Generator().manual_seed(seed)
    group = SimulatedGroup(W, device)
    dispatchers = [
        dispatcher_cls(None, E, H, MAX_TOKENS, dtype, device, heap=group.rank(p), tokens_per_program=tokens_per_program)
        for p in range(W)
    ]
    for tokens, skew_to, with_shared in steps:  # more steps than the ring has buffers
        run_step(dispatchers, device, dtype, E, K, tokens, skew_to, with_shared, g)


@pytest.mark.parametrize("few_programs", [False, True])
def test_fixed_edge_cases(device, dtype, dispatcher_cls, few_programs, monkeypatch):
    """K = E, all tokens on one expert, a rank with no tokens, every rank's max_tokens to one rank, odd sizes: one
    step each on 3 ranks. Rows are
    moved 8 columns at a time (3 column blocks), by a few programs per token block or slot (the decode
    launches), or, with the kernels' program budget at 1, by one that walks every column block."""
    from moekit.kernels import peer_puts

    monkeypatch.setattr(peer_puts, "_MAX_BLOCK_H", 8)
    if few_programs:
        monkeypatch.setattr(peer_puts, "_ENOUGH_PROGRAMS", 1)
    g = torch.Generator().manual_seed(7)
    cases = [(3, 3, [5, 0, 7], None), (6, 2, [MAX_TOKENS, 3, 1], 4), (3, 1, [0, 0, 0], None)]
    cases.append((6, 2, [MAX_TOKENS] * 3, 0))  # max_tokens from every rank to rank 0: its receive buffers full
    for E, K, tokens, skew_to in cases:
        group = SimulatedGroup(3, device)
        dispatchers = [dispatcher_cls(None, E, H, MAX_TOKENS, dtype, device, heap=group.rank(p)) for p in range(3)]
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
    assert {"nvshmem_triton", "nvshmem_triton_graph"} <= set(DISPATCHERS.names())
    for name in ("nvshmem_triton", "nvshmem_triton_graph"):
        ok, reason = DISPATCHERS.get(name).fn.supports(2, "cpu")
        assert not ok and "CUDA" in reason
        with pytest.raises(ValueError, match=f"{name}.*cannot run on 1 cpu ranks"):
            DISPATCHERS.get(name).fn(None, 4, H, MAX_TOKENS, torch.float32, "cpu")


def test_graph_replays_every_rank_step(device, dtype):
    """Two simulated ranks' dispatch and combine (fixed shapes) captured in one CUDA graph, replayed on new
    routings more times than the ring has buffers: every replay's rows and combine are right (the epochs
    live on the device, so each replay signals and waits for a new one)."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU; the CPU runs the same steps eagerly in the tests above")
    E, K, tokens = 6, 2, [MAX_TOKENS, 5]
    g = torch.Generator().manual_seed(3)
    group = SimulatedGroup(2, device)
    dispatchers = [
        NvshmemTritonGraphDispatcher(None, E, H, MAX_TOKENS, dtype, device, heap=group.rank(p)) for p in range(2)
    ]
    run_step(dispatchers, device, dtype, E, K, tokens, None, True, g)  # compiles, allocates the metadata ring
    xs = [torch.empty(T, H, device=device, dtype=dtype) for T in tokens]
    ids = [torch.empty(T, K, device=device, dtype=torch.int32) for T in tokens]
    ws = [torch.empty(T, K, device=device) for T in tokens]
    shared = [torch.empty(T, H, device=device, dtype=dtype) for T in tokens]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        received = dispatch_step(dispatchers, xs, ids, ws)
        ys = combine_step(dispatchers, received, shared)
    for _ in range(RING + 2):
        routings = [routing_for(T, E, K, None, g) for T in tokens]
        for p, T in enumerate(tokens):
            xs[p].copy_(torch.randn(T, H, generator=g))
            ids[p].copy_(routings[p][0])
            ws[p].copy_(routings[p][1])
            shared[p].copy_(torch.randn(T, H, generator=g))
        inputs = ([x.clone() for x in xs], routings, [s.clone() for s in shared])
        graph.replay()
        check_received(dispatchers, tokens, inputs, received)
        check_combined(dispatchers, inputs, ys)


def test_ep_forward_on_fixed_shapes_matches_oracle(device, skip_unless_triton_runs):
    """ep_forward on nvshmem_triton_graph (one rank; padded rows through moekit's grouped GEMM) equals the
    float64 oracle, chunked and not; on a GPU also captured in a CUDA graph and replayed on new tokens."""
    from moekit import MoEConfig, make_problem, reference_moe
    from moekit.ep import ep_forward

    skip_unless_triton_runs(torch.float32)
    config = MoEConfig(32, 48, 6, 3, num_shared_experts=1, dtype=torch.float32)
    problem = make_problem(config, 40, seed=5, device=device)
    d = NvshmemTritonGraphDispatcher(None, 6, 32, 40, torch.float32, device, heap=SimulatedGroup(1, device).rank(0))
    ref = reference_moe(problem.x, problem.weights, config).y
    for chunks in (1, 3):
        y = ep_forward(problem.x, problem.weights, config, d, "triton_grouped", chunks=chunks, shared_overlap=True)
        assert_close_to_reference(y, ref, torch.float32, f"ep_forward, {chunks} chunks")
    with pytest.raises(ValueError, match="only expert backend 'triton_grouped'.*got 'grouped_mm'"):
        ep_forward(problem.x, problem.weights, config, d, "grouped_mm")
    with pytest.raises(ValueError, match="own_first"):
        ep_forward(problem.x, problem.weights, config, d, "triton_grouped", own_first=True)
    if device.type != "cuda":
        return
    x = problem.x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ep_forward(x, problem.weights, config, d, "triton_grouped", check_values=False)
    for seed in range(RING + 1):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(device))
        graph.replay()
        ref = reference_moe(x, problem.weights, config).y
        assert_close_to_reference(y, ref, torch.float32, f"graph replay {seed}")
