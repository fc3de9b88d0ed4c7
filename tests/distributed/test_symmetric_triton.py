"""The symmetric_triton dispatcher: the symmetric layout's rows stored by Triton kernels into every rank's buffers.

Simulated groups (moekit.testing.simulated_heap: one process plays W ranks over one heap, every rank's
dispatch_async before any rank's dispatch_wait): on the CPU under TRITON_INTERPRET=1, on one GPU compiled.
Each step checks, on every rank, against what the routing says with capacity C per (source rank, expert):
  - the received rows (the first C pairs of each (source rank, expert), tokens ascending), their grouping
    (local expert, then source rank, then token), src_rank, src_token and weight;
  - combine of expert_out = (1 + local expert) * recv_x: sum over the kept pairs of w_k (1 + e_k mod E_local) x
    (+ shared_out); the drops counted on every rank (overflow="drop") or raised on every rank ("raise");
over more steps than the buffer ring has slots, with other sizes (stale rows must not leak).
Real ranks on a GPU: tests/distributed/test_gpu_dispatchers.py and test_layer_gpu.py walk every dispatcher.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.ep.symmetric_triton import RING, SymmetricTritonDispatcher, SymmetricTritonGraphDispatcher
from moekit.testing.capacity_edges import routing_at_capacity
from moekit.testing.numerics import assert_close_to_reference
from moekit.testing.simulated_heap import SimulatedGroup

H = 20
MAX_TOKENS = 10


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=str)
def dtype(request, skip_unless_triton_runs):
    skip_unless_triton_runs(request.param)
    return request.param


@pytest.fixture(params=[SymmetricTritonDispatcher, SymmetricTritonGraphDispatcher], ids=lambda cls: cls.name)
def dispatcher_class(request):
    return request.param


def make_group(W, E, capacity, overflow, dtype, device, cls=SymmetricTritonDispatcher):
    group = SimulatedGroup(W, device)
    return [
        cls(None, E, H, MAX_TOKENS, dtype, device, heap=group.rank(p), capacity=capacity, overflow=overflow)
        for p in range(W)
    ]


def draw_step(W, E, K, tokens, skew_to, g, device, dtype):
    """Every rank's (x, topk_ids, topk_weights, shared_out) for one step."""
    step = []
    for T in tokens:
        scores = torch.rand(T, E, generator=g)
        if skew_to is not None:
            scores[:, skew_to] += 2.0  # every token picks this expert
        ids = scores.argsort(dim=1, descending=True)[:, :K].to(torch.int32)
        weights = torch.rand(T, K, generator=g) + 0.1
        x, shared = (torch.randn(T, H, generator=g) for _ in range(2))
        step.append(tuple(t.to(device) for t in (x.to(dtype), ids, weights, shared.to(dtype))))
    return step


def kept_pairs(step, capacity):
    """kept[p]: bool [T, K], pair (t, k) of rank p among the first `capacity` of its expert (tokens ascending)."""
    kept = []
    for _, ids, _, _ in step:
        seen: dict[int, int] = {}
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for t, row in enumerate(ids.tolist()):
            for k, g in enumerate(row):
                mask[t, k] = seen.get(g, 0) < capacity
                seen[g] = seen.get(g, 0) + 1
        kept.append(mask)
    return kept


def check_received(dispatchers, step, kept, received):
    W, E_local = len(dispatchers), dispatchers[0].num_local_experts
    for q, (recv_x, meta, handle) in enumerate(received):
        want = sorted(
            (g % E_local, p, t, k)
            for p, (_, ids, _, _) in enumerate(step)
            for t, row in enumerate(ids.tolist())
            for k, g in enumerate(row)
            if g // E_local == q and kept[p][t, k]
        )
        R = len(want)
        rows = dispatchers[q].num_slots if dispatchers[q].fixed_shapes else R  # the bound: padding after R
        assert recv_x.shape[0] == meta.num_rows == handle.num_rows == rows, f"rank {q}: rows"
        assert (meta.src_rank[R:] == -1).all() and (meta.weight[R:] == 0).all(), f"rank {q}: padding rows"
        assert (handle.recv_slot_of_row[R:] == -1).all(), f"rank {q}: padding rows are not sent back"
        got_expert = torch.repeat_interleave(torch.arange(E_local), meta.local_expert_counts.cpu())
        got = list(zip(got_expert.tolist(), meta.src_rank[:R].tolist(), meta.src_token[:R].tolist()))
        assert got == [r[:3] for r in want], f"rank {q}: rows or their order"
        assert meta.local_expert_offsets.tolist() == [0, *meta.local_expert_counts.cumsum(0).tolist()]
        for i, (_, p, t, k) in enumerate(want):
            assert torch.equal(recv_x[i].cpu(), step[p][0][t].cpu()), f"rank {q} row {i}"
            assert meta.weight[i].item() == step[p][2][t, k].item()
        assert handle.recv_counts.tolist() == [sum(1 for r in want if r[1] == p) for p in range(W)]


def run_step(dispatchers, step):
    """Every rank's dispatch_async, then every rank's dispatch_wait (the ranks in lockstep)."""
    pendings = [d.dispatch_async(x, ids, w) for d, (x, ids, w, _) in zip(dispatchers, step)]
    return [d.dispatch_wait(p) for d, p in zip(dispatchers, pendings)]


def combine(dispatchers, step, received):
    """Every rank's combine_async of expert_out = (1 + local expert) * recv_x, then every rank's combine_wait."""
    pendings = []
    for d, (_, _, _, shared), (recv_x, meta, handle) in zip(dispatchers, step, received):
        expert = torch.repeat_interleave(torch.arange(d.num_local_experts), meta.local_expert_counts.cpu())
        factor = torch.zeros(recv_x.shape[0])  # padding rows (fixed shapes): never sent back
        factor[: expert.numel()] = 1 + expert
        out = recv_x * factor.to(recv_x.device, recv_x.dtype)[:, None]
        pendings.append(d.combine_async(out, handle, shared))
    return [d.combine_wait(p) for d, p in zip(dispatchers, pendings)]


def check_combined(dispatchers, step, kept, ys):
    E_local = dispatchers[0].num_local_experts
    for p, ((x, ids, weights, shared), y) in enumerate(zip(step, ys)):
        factor = (weights.cpu() * (1 + ids.long().cpu() % E_local) * kept[p]).sum(1, dtype=torch.float64)
        ref = factor[:, None] * x.cpu().double() + shared.cpu().double()
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_close_to_reference(y.cpu(), ref, x.dtype, f"rank {p} combine")


@st.composite
def scenarios(draw):
    W = draw(st.integers(1, 4))
    E = W * draw(st.integers(1, 3))
    K = draw(st.integers(1, E))
    steps = [
        ([draw(st.sampled_from([0, 1, MAX_TOKENS]) | st.integers(0, MAX_TOKENS)) for _ in range(W)],
         draw(st.none() | st.integers(0, E - 1)))
        for _ in range(RING + 1)
    ]  # fmt: skip
    return W, E, K, draw(st.integers(1, MAX_TOKENS)), steps, draw(st.integers(0, 2**31 - 1))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=10, deadline=None)
@given(case=scenarios())
def test_simulated_group_dispatch_combine_drops_and_counts(device, dtype, dispatcher_class, case):
    """overflow="drop": rows, combine, the drops on every rank and the padding fraction, step after step."""
    W, E, K, capacity, steps, seed = case
    g = torch.Generator().manual_seed(seed)
    dispatchers = make_group(W, E, capacity, "drop", dtype, device, dispatcher_class)
    for tokens, skew_to in steps:  # more steps than the ring has slots
        step = draw_step(W, E, K, tokens, skew_to, g, device, dtype)
        kept = kept_pairs(step, capacity)
        received = run_step(dispatchers, step)
        check_received(dispatchers, step, kept, received)
        dropped = [int((~k).sum()) for k in kept]
        slots = W * E * capacity
        for p, d in enumerate(dispatchers):
            assert (d.last_dropped, d.last_dropped_total) == (dropped[p], sum(dropped)), f"rank {p} drops"
            padding = None if d.fixed_shapes else (slots - sum(int(k.sum()) for k in kept)) / slots
            assert d.last_padding_fraction == padding
        check_combined(dispatchers, step, kept, combine(dispatchers, step, received))


def test_overflow_raises_on_every_rank_and_the_next_step_runs(device, dtype):
    W, E, K, capacity = 2, 4, 2, 3
    g = torch.Generator().manual_seed(0)
    dispatchers = make_group(W, E, capacity, "raise", dtype, device)
    over = draw_step(W, E, K, [MAX_TOKENS, 2], 1, g, device, dtype)  # rank 0: 10 pairs for expert 1
    pendings = [d.dispatch_async(x, ids, w) for d, (x, ids, w, _) in zip(dispatchers, over)]
    for d, pending in zip(dispatchers, pendings):  # every rank raises, after every rank's rows arrived
        with pytest.raises(ValueError, match=rf"rank 0 routed {MAX_TOKENS} tokens to expert 1, above the capacity 3"):
            d.dispatch_wait(pending)
    fits = draw_step(W, E, K, [capacity, 1], 1, g, device, dtype)
    received = run_step(dispatchers, fits)
    kept = kept_pairs(fits, capacity)
    assert all(k.all() for k in kept)
    check_received(dispatchers, fits, kept, received)
    check_combined(dispatchers, fits, kept, combine(dispatchers, fits, received))


def edge_step(routings, device, dtype, seed):
    """Every rank's (x, topk_ids, topk_weights, shared_out) for the routings of moekit.testing.capacity_edges."""
    g = torch.Generator().manual_seed(seed)
    return [
        tuple(t.to(device) for t in (torch.randn(ids.shape[0], H, generator=g).to(dtype), ids, w,
                                     torch.randn(ids.shape[0], H, generator=g).to(dtype)))
        for ids, w in routings
    ]  # fmt: skip


@pytest.mark.parametrize("W", [1, 3])
def test_capacity_holds_exactly_capacity_and_one_pair_more_drops_or_raises(device, dtype, dispatcher_class, W):
    """Exactly C pairs of one (rank, expert): all received, none dropped; C + 1 for one (rank, expert) only: that
    one pair dropped and counted (overflow="drop"), or a ValueError on every rank ("raise", symmetric_triton)."""
    E, K, C = max(2 * W, 4), 2, 3
    overflows = ["drop"] if dispatcher_class.fixed_shapes else ["drop", "raise"]
    for overflow in overflows:
        dispatchers = make_group(W, E, C, overflow, dtype, device, dispatcher_class)
        at = edge_step(routing_at_capacity(W, E, K, C, seed=W), device, dtype, seed=1)
        received = run_step(dispatchers, at)
        kept = kept_pairs(at, C)
        assert all(k.all() for k in kept)
        check_received(dispatchers, at, kept, received)
        assert [(d.last_dropped, d.last_dropped_total) for d in dispatchers] == [(0, 0)] * W
        check_combined(dispatchers, at, kept, combine(dispatchers, at, received))

        one_over = edge_step(routing_at_capacity(W, E, K, C, over_rank=W - 1, seed=W), device, dtype, seed=2)
        if overflow == "raise":
            pendings = [d.dispatch_async(x, ids, w) for d, (x, ids, w, _) in zip(dispatchers, one_over)]
            for d, pending in zip(dispatchers, pendings):
                with pytest.raises(ValueError, match=rf"rank {W - 1} routed {C + 1} tokens to expert 0, above the"):
                    d.dispatch_wait(pending)
            continue
        received = run_step(dispatchers, one_over)
        kept = kept_pairs(one_over, C)
        assert sum(int((~k).sum()) for k in kept) == 1 and not kept[W - 1][-1, 0]  # the routing's promise
        check_received(dispatchers, one_over, kept, received)
        assert [(d.last_dropped, d.last_dropped_total) for d in dispatchers] == [(int(p == W - 1), 1) for p in range(W)]
        check_combined(dispatchers, one_over, kept, combine(dispatchers, one_over, received))


def test_max_tokens_holds_exactly_max_tokens_and_refuses_one_more(device, dtype, dispatcher_class):
    """The default capacity is max_tokens: every rank's MAX_TOKENS tokens on expert 0 fit, nothing dropped; one
    token more is refused on every rank before anything is stored."""
    W, E, K = 2, 4, 2
    dispatchers = make_group(W, E, None, "drop", dtype, device, dispatcher_class)
    at = edge_step(routing_at_capacity(W, E, K, MAX_TOKENS), device, dtype, seed=3)
    received = run_step(dispatchers, at)
    kept = kept_pairs(at, MAX_TOKENS)
    check_received(dispatchers, at, kept, received)
    assert [(d.last_dropped, d.last_dropped_total) for d in dispatchers] == [(0, 0)] * W
    check_combined(dispatchers, at, kept, combine(dispatchers, at, received))
    above = edge_step(routing_at_capacity(W, E, K, MAX_TOKENS + 1), device, dtype, seed=4)
    for d, (x, ids, w, _) in zip(dispatchers, above):
        with pytest.raises(ValueError, match=rf"{MAX_TOKENS + 1} tokens, above max_tokens={MAX_TOKENS}"):
            d.dispatch_async(x, ids, w)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=6, deadline=None)
@given(case=scenarios(), F=st.integers(1, 24))
def test_fused_combine_stores_the_down_projection_where_combine_sends_it(device, dtype, dispatcher_class, case, F):
    """combine_down_async: the grouped GEMM's epilogue stores hidden @ w_down[e].T times the router weight into
    the source's back buffer; y = the float64 MLP summed over the kept pairs (+ shared_out), step after step."""
    from moekit.kernels.grouped_gemm import grouped_gemm

    W, E, K, capacity, steps, seed = case
    g = torch.Generator().manual_seed(seed)
    w_gate_up, w_down = torch.randn(E, 2 * F, H, generator=g) / H**0.5, torch.randn(E, H, F, generator=g) / F**0.5
    dispatchers = make_group(W, E, capacity, "drop", dtype, device, dispatcher_class)
    E_local = E // W
    for tokens, skew_to in steps:
        step = draw_step(W, E, K, tokens, skew_to, g, device, dtype)
        received = run_step(dispatchers, step)
        combines = []
        for q, (d, (recv_x, meta, handle), (_, _, _, shared)) in enumerate(zip(dispatchers, received, step)):
            mine = slice(q * E_local, (q + 1) * E_local)
            gate_up, down = (w[mine].to(device, dtype) for w in (w_gate_up, w_down))
            hidden = grouped_gemm(recv_x, gate_up, meta.local_expert_offsets, swiglu=True)
            combines.append(d.combine_down_async(hidden, down, meta, handle, shared))
        ys = [d.combine_wait(p) for d, p in zip(dispatchers, combines)]
        for p, ((x, ids, weights, shared), kept, y) in enumerate(zip(step, kept_pairs(step, capacity), ys)):
            ref = shared.cpu().double().clone()
            x64 = x.cpu().double()
            for t, k in kept.nonzero().tolist():
                e = int(ids[t, k])
                h = torch.nn.functional.silu(x64[t] @ w_gate_up[e, :F].double().T) * (
                    x64[t] @ w_gate_up[e, F:].double().T
                )
                ref[t] += float(weights[t, k]) * (h @ w_down[e].double().T)
            assert_close_to_reference(y.cpu(), ref, dtype, f"rank {p} fused combine")


def test_fused_combine_refuses_what_it_cannot_fuse(device, skip_unless_triton_runs):
    from moekit import MoEConfig, make_problem
    from moekit.ep import ep_forward
    from moekit.layer import MoELayer

    skip_unless_triton_runs(torch.float32)
    d = make_group(1, 4, MAX_TOKENS, "raise", torch.float32, device)[0]
    x = torch.randn(3, H, device=device)
    recv_x, meta, handle = d.dispatch(x, torch.tensor([[0], [1], [3]], device=device), torch.ones(3, 1, device=device))
    with pytest.raises(ValueError, match=r"w_down must be \[4, 20, 8\]"):
        d.combine_down_async(recv_x.new_ones(3, 8), recv_x.new_ones(4, 8, H), meta, handle)
    with pytest.raises(ValueError, match=r"hidden must be \[3, F\]"):
        d.combine_down_async(recv_x.new_ones(2, 8), recv_x.new_ones(4, H, 8), meta, handle)
    config = MoEConfig(H, 8, 4, 1, dtype=torch.float32)
    problem = make_problem(config, 3, device=device)
    with pytest.raises(ValueError, match="pass backend 'triton_grouped'"):
        ep_forward(problem.x, problem.weights, config, d, "grouped_mm", fused_combine=True)
    with pytest.raises(ValueError, match="fused_combine and own_first"):
        ep_forward(problem.x, problem.weights, config, d, "triton_grouped", fused_combine=True, own_first=True)
    with pytest.raises(ValueError, match="fuses the down projection"):
        MoELayer(config, backend="triton_grouped", dispatcher="skip_a2a", fused_combine=True, device=device)
    with pytest.raises(ValueError, match="pass dispatcher='symmetric_triton'"):
        MoELayer(config, backend="triton_grouped", fused_combine=True, device=device)


def test_bad_settings_raise_before_anything_is_allocated(device, skip_unless_triton_runs):
    skip_unless_triton_runs(torch.float32)
    heap = SimulatedGroup(2, device).rank(0)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        SymmetricTritonDispatcher(None, 4, H, MAX_TOKENS, torch.float32, device, heap=heap, capacity=0)
    with pytest.raises(ValueError, match="overflow must be one of"):
        SymmetricTritonDispatcher(None, 4, H, MAX_TOKENS, torch.float32, device, heap=heap, overflow="ignore")
    with pytest.raises(ValueError, match="divisible by the world size"):
        SymmetricTritonDispatcher(None, 3, H, MAX_TOKENS, torch.float32, device, heap=heap)
    with pytest.raises(ValueError, match="overflow must be 'drop' for the symmetric_triton_graph dispatcher"):
        SymmetricTritonGraphDispatcher(None, 4, H, MAX_TOKENS, torch.float32, device, heap=heap, overflow="raise")


def test_ep_forward_on_fixed_shapes_matches_oracle_and_replays_as_a_graph(device, skip_unless_triton_runs):
    """ep_forward on symmetric_triton_graph (one rank; padded rows through moekit's grouped GEMM), chunked or
    not, fused combine or not, equals the float64 oracle; on a GPU also captured in a CUDA graph and replayed
    on new tokens more times than the ring has slots."""
    from moekit import MoEConfig, make_problem, reference_moe
    from moekit.ep import ep_forward

    skip_unless_triton_runs(torch.float32)
    config = MoEConfig(32, 48, 6, 3, num_shared_experts=1, dtype=torch.float32)
    problem = make_problem(config, 40, seed=5, device=device)
    heap = SimulatedGroup(1, device).rank(0)
    d = SymmetricTritonGraphDispatcher(None, 6, 32, 40, torch.float32, device, heap=heap, capacity=40)
    ref = reference_moe(problem.x, problem.weights, config).y
    for chunks, fused in ((1, False), (3, False), (1, True)):
        y = ep_forward(
            problem.x, problem.weights, config, d, "triton_grouped", chunks=chunks, shared_overlap=True,
            fused_combine=fused,
        )  # fmt: skip
        assert_close_to_reference(y, ref, torch.float32, f"ep_forward, {chunks} chunks, fused combine {fused}")
    assert (d.last_dropped, d.last_dropped_total) == (0, 0)
    if device.type != "cuda":
        return
    x = problem.x.clone()
    for fused in (False, True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ep_forward(x, problem.weights, config, d, "triton_grouped", check_values=False, fused_combine=fused)
        for seed in range(RING + 1):
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(device))
            graph.replay()
            ref = reference_moe(x, problem.weights, config).y
            assert_close_to_reference(y, ref, torch.float32, f"graph replay {seed}, fused combine {fused}")
