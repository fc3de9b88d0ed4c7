"""Expert-parallel dispatch and combine (moekit.ep), every registered path on every world size it runs on.

One spawn per world size runs every check on every rank (spawning costs seconds; the checks
milliseconds) and returns what each rank saw; the tests below compare it with independent
single-process computations:
  - layout (DeepEP style): each token row carries its provenance (column 0 = source rank, column 1 =
    source token index); the rows, local expert counts, src_rank, src_token and weight each rank
    received equal who-should-receive-what computed here, in the documented order, and each token went
    to each destination rank at most once (the send counts on the wire);
  - identity experts: combine(dispatch(x)) with expert_out = recv_x is sum_k w_k x (+ shared_out),
    exactly for integer-valued x with weights 1;
  - real experts: ep_forward on each rank's slice of the tokens equals reference_moe on all of them;
  - buffers reused over calls with alternating sizes, padding_fraction, a fixed capacity, argument errors.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from moekit import MoEConfig, make_problem, reference_moe, route
from moekit.ep import DISPATCHERS, ep_forward
from moekit.experts import EXPERT_BACKENDS
from moekit.experts.mlp import swiglu_mlp
from moekit.testing.capacity_edges import kept_pairs, routing_at_capacity
from moekit.testing.numerics import assert_close_to_reference
from moekit.testing.spawn import spawn_ranks

WORLD_SIZES = (1, 2, 3, 4)
SEED = 20240611
H = 8  # hidden size of the layout problems
MAX_TOKENS = 24
CAPACITY = 3
UNEVEN = {1: [11], 2: [13, 6], 3: [5, 0, 9], 4: [1, 8, 0, 16]}
F32, F64 = torch.float32, torch.float64


def paths_for(world_size: int) -> list[str]:
    return [impl.name for impl in DISPATCHERS if impl.fn.supports(world_size, "cpu")[0]]


def make_dispatcher(
    path: str, num_experts: int, hidden: int = H, max_tokens: int = MAX_TOKENS, dtype: torch.dtype = F32, **kwargs
):
    return DISPATCHERS.get(path).fn(None, num_experts, hidden, max_tokens, dtype, "cpu", **kwargs)


# ---- layout problems: provenance in the rows ---------------------------------------------------------


def layout_problem(tokens_per_rank, num_experts, top_k, seed, integer, dtype=F32):
    """Tokens of every rank [N, H] (column 0 = source rank, 1 = token index), topk_ids [N, K] (distinct
    per token; int32 for even seeds), topk_weights [N, K] (ones when integer) and a shared_out [N, H], in
    dtype. Drawn in float64 and rounded: float64 weights use all 53 bits, so a float32 hop loses some."""
    g = torch.Generator().manual_seed(seed)
    W, N = len(tokens_per_rank), sum(tokens_per_rank)
    src = torch.repeat_interleave(torch.arange(W), torch.tensor(tokens_per_rank, dtype=torch.int64))
    if integer:
        x = torch.randint(-8, 9, (N, H), generator=g).to(F64)
    else:
        x = torch.randn(N, H, generator=g, dtype=F64)
    x[:, 0] = src.to(F64)
    x[:, 1] = torch.cat([torch.arange(T) for T in tokens_per_rank]).to(F64) if N else x[:, 1]
    scores = torch.rand(N, num_experts, generator=g)
    scores[:, 0] += 0.5 * (src == W - 1)  # skew: the last rank's tokens favour expert 0
    ids = scores.argsort(dim=1, descending=True)[:, :top_k].to(torch.int32 if seed % 2 == 0 else torch.int64)
    weights = torch.ones(N, top_k, dtype=F64) if integer else torch.rand(N, top_k, generator=g, dtype=F64) + 0.1
    shared = torch.randint(-3, 4, (N, H), generator=g).to(F64) if integer else torch.randn(N, H, generator=g, dtype=F64)
    return x.to(dtype), ids, weights.to(dtype), shared.to(dtype)


def rank_slice(tokens_per_rank, rank) -> slice:
    start = sum(tokens_per_rank[:rank])
    return slice(start, start + tokens_per_rank[rank])


def layout_scenarios(world_size: int, seed: int) -> list[tuple]:
    """(name, tokens_per_rank, E, K, seed, integer, with_shared): fixed edge cases, then drawn ones."""
    ws = world_size
    scenarios = [
        ("uneven", UNEVEN[ws], 3 * ws, 2, seed, True, True),
        ("one-source", [0] * (ws - 1) + [MAX_TOKENS], 2 * ws, 2, seed + 1, False, False),
        ("all-to-rank-0-experts", [MAX_TOKENS] * ws, 2 * ws, 1, seed + 2, True, False),
    ]
    g = random.Random(seed * 10 + ws)
    for i in range(3):
        num_experts = g.randint(1, 3) * ws
        tokens = [g.randint(0, MAX_TOKENS) for _ in range(ws)]
        scenarios.append((f"drawn{i}", tokens, num_experts, g.randint(1, num_experts), seed + 3 + i, i != 1, i == 1))
    return scenarios


def repeat_scenarios(world_size: int, seed: int) -> list[tuple]:
    """One dispatcher (E = 2W) called with alternating token counts; K changes once (padded: new metadata)."""
    out = []
    for i in range(5):
        tokens = [MAX_TOKENS if (i + r) % 2 == 0 else (i + r) % 3 for r in range(world_size)]
        out.append((f"call{i}", tokens, 2 * world_size, 1 if i == 3 else 2, seed + 100 + i, i % 2 == 0, i == 2))
    return out


def problem_of(scenario, dtype=F32):
    _, tokens, num_experts, top_k, seed, integer, _ = scenario
    if scenario[0] == "all-to-rank-0-experts":  # every token picks expert 0 (owned by rank 0)
        x, ids, w, shared = layout_problem(tokens, num_experts, top_k, seed, integer, dtype)
        return x, torch.zeros_like(ids), w, shared
    return layout_problem(tokens, num_experts, top_k, seed, integer, dtype)


def run_layout(dispatcher, scenario, rank: int, use_async: bool) -> dict:
    """Dispatch this rank's tokens of the scenario (in the dispatcher's dtype), combine with identity experts;
    what the rank saw."""
    tokens, with_shared = scenario[1], scenario[6]
    x, ids, w, shared = (t[rank_slice(tokens, rank)] for t in problem_of(scenario, dispatcher.dtype))
    shared_out = shared if with_shared else None
    if use_async:
        recv_x, meta, handle = dispatcher.dispatch_wait(dispatcher.dispatch_async(x, ids, w))
        # shared_out is read by combine_wait: filled only after combine_async, as ep_forward's overlap does
        late_shared = None if shared_out is None else torch.full_like(shared_out, float("nan"))
        pending = dispatcher.combine_async(recv_x, handle, late_shared)
        if late_shared is not None:
            late_shared.copy_(shared_out)
        y = dispatcher.combine_wait(pending)
    else:
        recv_x, meta, handle = dispatcher.dispatch(x, ids, w)
        y = dispatcher.combine(recv_x, handle, shared_out)
    return {
        "recv_x": recv_x,
        "counts": meta.local_expert_counts,
        "offsets": meta.local_expert_offsets,
        "src_rank": meta.src_rank,
        "src_token": meta.src_token,
        "weight": meta.weight,
        "send_counts": handle.send_counts,
        "recv_counts": handle.recv_counts,
        "wire_rows": handle.send_token_idx.numel(),
        "y": y,
        "padding_fraction": handle.padding_fraction,
        "last_padding_fraction": getattr(dispatcher, "last_padding_fraction", None),
        "slots_per_peer": handle.slots_per_peer,
        "rows_on_the_wire": dispatcher.rows_on_the_wire,
        "path": dispatcher.name,
        "capacity": getattr(dispatcher, "capacity", None),
        "dtype": dispatcher.dtype,
    }


def caught(fn, *args, **kwargs) -> str:
    """The message of the exception fn(*args, **kwargs) raises (with its type), or 'no error'."""
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


# ---- real experts ------------------------------------------------------------------------------------


def ep_scenarios(world_size: int, seed: int) -> list[tuple]:
    """(name, config, tokens_per_rank, seed, skew_experts, skew_amount)."""
    ws = world_size
    with_shared = MoEConfig(16, 12, 4 * ws, 3, num_shared_experts=2, shared_ffn_size=8, dtype=F32)
    plain = MoEConfig(16, 8, 2 * ws, 2, dtype=F32)
    return [
        ("uneven-shared", with_shared, UNEVEN[ws], seed, 0, 0.0),
        ("all-to-rank-0", plain, [5, 9, 3, 7][:ws], seed + 1, 2, 50.0),  # E_local = 2 >= top_k
        ("one-source", with_shared, [0] * (ws - 1) + [MAX_TOKENS], seed + 2, 0, 0.0),
    ]


def ep_problem(scenario):
    _, config, tokens, seed, skew_experts, skew_amount = scenario
    return make_problem(config, sum(tokens), seed=seed, skew_experts=skew_experts, skew_amount=skew_amount)


# ---- the rank function: every check of one world size ----------------------------------------------
#
# spawn_ranks returns results through a pipe it reads only after every rank has exited, so what a rank
# returns must stay small: the ranks compare with the independent expectations themselves and return
# "ok" or the failure message per check (and the messages of the errors they were meant to raise).


def record(checks: dict, key: str, check, *args, **kwargs) -> None:
    """Run a comparison check(*args, **kwargs) (no communication inside); record "ok" or its failure."""
    try:
        check(*args, **kwargs)
        checks[key] = "ok"
    except Exception as error:  # noqa: BLE001 - any failure is reported, by rank, in the test
        checks[key] = f"{type(error).__name__}: {error}"[:600]


def rank_main(rank: int, world_size: int, seed: int) -> dict:
    checks, errors = {}, {}
    for path in paths_for(world_size):
        for i, s in enumerate(layout_scenarios(world_size, seed)):
            got = run_layout(make_dispatcher(path, s[2]), s, rank, use_async=i % 2 == 1)
            record(checks, f"layout/{path}/{s[0]}", check_layout, got, s, world_size, rank)
        reused = make_dispatcher(path, 2 * world_size)
        for i, s in enumerate(repeat_scenarios(world_size, seed)):
            got = run_layout(reused, s, rank, use_async=i % 2 == 0)
            record(checks, f"repeat/{path}/{s[0]}", check_layout, got, s, world_size, rank)
        for i, s in enumerate(layout_scenarios(world_size, seed)):
            got = run_layout(make_dispatcher(path, s[2], dtype=F64), s, rank, use_async=i % 2 == 0)
            record(checks, f"float64/{path}/{s[0]}", check_layout, got, s, world_size, rank)
        for scenario in ep_scenarios(world_size, seed):
            problem = ep_problem(scenario)
            d = make_dispatcher(path, problem.config.num_experts, hidden=problem.config.hidden_size)
            mine = rank_slice(scenario[2], rank)
            y = ep_forward(problem.x[mine], problem.weights, problem.config, d, "grouped_loop")
            record(checks, f"ep/{path}/{scenario[0]}", check_ep, y, scenario, problem, world_size, mine)
            if path == "skip_a2a":
                expected = single_process_forward(problem)
                record(
                    checks,
                    f"single/{path}/{scenario[0]}",
                    torch.testing.assert_close,
                    y,
                    expected,
                    rtol=1e-5,
                    atol=1e-6,
                )

        small = make_dispatcher(path, 2 * world_size, max_tokens=4)
        x, ids, w, _ = layout_problem([5] * world_size, 2 * world_size, 2, seed, False)
        mine = rank_slice([5] * world_size, rank)
        mistakes = {"above max_tokens": caught(small.dispatch, x[mine], ids[mine], w[mine])}
        d = make_dispatcher(path, 2 * world_size)
        x, ids, w = x[mine], ids[mine], w[mine]
        mistakes["id out of range"] = caught(d.dispatch, x, ids + 2 * world_size, w)
        mistakes["float ids"] = caught(d.dispatch, x, ids.float(), w)
        mistakes["x dtype"] = caught(d.dispatch, x.double(), ids, w)
        mistakes["weights shape"] = caught(d.dispatch, x, ids, w[:, :1])
        recv_x, _, handle = d.dispatch(x, ids, w)
        mistakes["expert_out shape"] = caught(d.combine, recv_x[:, :-1], handle)
        d.combine(recv_x, handle)  # every rank completes the step it started
        if world_size > 1:
            mistakes["indivisible experts"] = caught(make_dispatcher, path, 2 * world_size + 1)
        errors[path] = mistakes
    if world_size > 1:
        errors["skip_a2a"] = {"more than one rank": caught(make_dispatcher, "skip_a2a", 2 * world_size)}

    capped = make_dispatcher("padded", 2 * world_size, capacity=CAPACITY)
    over, fits = capacity_scenarios(world_size, seed)
    x, ids, w, _ = problem_of(over)
    mine = rank_slice(over[1], rank)
    errors["capacity overflow"] = caught(capped.dispatch, x[mine], ids[mine], w[mine])
    got = run_layout(capped, fits, rank, use_async=False)  # usable after the error
    record(checks, "capacity/fits", check_layout, got, fits, world_size, rank)

    capped = make_dispatcher("symmetric", 2 * world_size, capacity=CAPACITY)
    errors["symmetric overflow"] = caught(run_layout, capped, over, rank, use_async=False)
    got = run_layout(capped, fits, rank, use_async=True)  # usable after the error
    record(checks, "symmetric-capacity/fits", check_layout, got, fits, world_size, rank)
    dropping = make_dispatcher("symmetric", 2 * world_size, capacity=CAPACITY, overflow="drop")
    got = run_layout(dropping, over, rank, use_async=False)
    got["dropped"], got["dropped_total"] = dropping.last_dropped, dropping.last_dropped_total
    record(checks, "symmetric-capacity/drop", check_dropping, got, over, world_size, rank, CAPACITY)
    drops = capacity_edges(checks, errors, rank, world_size, seed)
    return {"checks": checks, "errors": errors, "drops": drops}


# ---- exactly at a capacity, and one above it -------------------------------------------------------

EDGE_TOP_K = 2


def edge_experts(world_size: int) -> int:
    """E for the edge routings: at least 2K - 1 = 3, and expert 2 on another rank when there is one."""
    return max(2 * world_size, 4)


def edge_step(dispatcher, routing, seed: int):
    """Dispatch random rows [T, H] with this rank's routing, combine with identity experts -> (y, sum_k w_k x)
    over the pairs a capacity of CAPACITY keeps (kept_pairs: dropped only on the rank above it, "drop" mode)."""
    ids, w = routing
    x = torch.randn(ids.shape[0], H, generator=torch.Generator().manual_seed(seed))
    recv_x, _, handle = dispatcher.dispatch(x, ids, w)
    y = dispatcher.combine(recv_x, handle)
    over = getattr(dispatcher, "overflow", None) == "drop" and ids.shape[0] > CAPACITY
    kept = kept_pairs(routing, dropped=over)
    return y, ((w * kept).double()[:, :, None] * x.double()[:, None, :]).sum(1)


def capacity_edges(checks: dict, errors: dict, rank: int, world_size: int, seed: int) -> dict:
    """Every path with a capacity at exactly CAPACITY (passes, nothing dropped) and one pair above it (raises on
    every rank, or drops exactly that pair and counts it); every path at max_tokens and max_tokens + 1.
    Returns the (last_dropped, last_dropped_total) each capped step left."""
    drops = {}
    E, K, last = edge_experts(world_size), EDGE_TOP_K, world_size - 1
    at = routing_at_capacity(world_size, E, K, CAPACITY, seed=seed)[rank]
    one_over = routing_at_capacity(world_size, E, K, CAPACITY, over_rank=last, seed=seed)[rank]
    capped = {
        "padded": dict(capacity=CAPACITY),
        "symmetric-raise": dict(capacity=CAPACITY, overflow="raise"),
        "symmetric-drop": dict(capacity=CAPACITY, overflow="drop"),
    }
    for name, kwargs in capped.items():
        d = make_dispatcher(name.split("-")[0], E, **kwargs)
        y, expected = edge_step(d, at, seed + rank)
        record(checks, f"edge/{name}/at-capacity", assert_close_to_reference, y, expected, F32, name)
        drops[f"{name}/at-capacity"] = (getattr(d, "last_dropped", 0), getattr(d, "last_dropped_total", 0))
        if name == "symmetric-drop":
            y, expected = edge_step(d, one_over, seed + rank)
            record(checks, f"edge/{name}/one-over", assert_close_to_reference, y, expected, F32, name)
            drops[f"{name}/one-over"] = (d.last_dropped, d.last_dropped_total)
        else:
            errors[f"edge/{name}/one-over"] = caught(edge_step, d, one_over, seed + rank)
    for path in paths_for(world_size):  # max_tokens = CAPACITY: the receive buffers' bound (symmetric: C)
        d = make_dispatcher(path, E, max_tokens=CAPACITY)
        y, expected = edge_step(d, at, seed + rank)
        record(checks, f"edge/max_tokens/{path}/at-max", assert_close_to_reference, y, expected, F32, path)
        above = routing_at_capacity(world_size, E, K, CAPACITY + 1, seed=seed)[rank]  # every rank: one token more
        errors[f"edge/max_tokens/{path}/one-over"] = caught(edge_step, d, above, seed + rank)
    return drops


def check_dropping(got: dict, scenario, world_size: int, q: int, capacity: int) -> None:
    """overflow="drop": each rank keeps its first `capacity` pairs per expert (tokens ascending); y sums the
    kept pairs only, and the drops are counted on this rank and over the group."""
    x, ids, w, _ = problem_of(scenario)
    kept = torch.zeros(ids.shape, dtype=torch.bool)
    dropped = [0] * world_size
    for p in range(world_size):
        seen: dict[int, int] = {}
        for t in range(rank_slice(scenario[1], p).start, rank_slice(scenario[1], p).stop):
            for k, e in enumerate(ids[t].tolist()):
                seen[e] = seen.get(e, 0) + 1
                kept[t, k] = seen[e] <= capacity
                dropped[p] += seen[e] > capacity
    assert sum(dropped) > 0, "the scenario drops nothing"
    assert (got["dropped"], got["dropped_total"]) == (dropped[q], sum(dropped))
    mine = rank_slice(scenario[1], q)
    weights = (w * kept)[mine].double()
    expected = (weights[:, :, None] * x[mine].double()[:, None, :]).sum(1)
    assert_close_to_reference(got["y"], expected, F32, "combine of the kept pairs")


def capacity_scenarios(world_size: int, seed: int) -> tuple[tuple, tuple]:
    over = ("over", [MAX_TOKENS] * world_size, 2 * world_size, 2, seed + 200, False, False)
    fits = ("fits", [2] * world_size, 2 * world_size, 2, seed + 201, False, True)
    return over, fits


@functools.cache
def world(world_size: int) -> list[dict]:
    return spawn_ranks(rank_main, world_size, SEED, timeout_s=120)


# ---- independent expectations --------------------------------------------------------------------


def expected_receive(scenario, world_size: int, q: int, dtype=F32) -> dict:
    """What rank q should receive: rows grouped by its local experts, then source rank, then token; the router
    weights at the precision they travel at (float64 for float64 rows, float32 otherwise)."""
    x, ids, w, _ = problem_of(scenario, dtype)
    weight_dtype = torch.promote_types(dtype, F32)
    e_local = scenario[2] // world_size
    rows, src_rank, src_token, weight, counts = [], [], [], [], []
    for e in range(q * e_local, (q + 1) * e_local):
        n = 0
        for t in range(x.shape[0]):  # global order = source rank, then token index
            for k in (ids[t] == e).nonzero().flatten().tolist():
                rows.append(x[t])
                src_rank.append(int(x[t, 0]))
                src_token.append(int(x[t, 1]))
                weight.append(w[t, k])
                n += 1
        counts.append(n)
    return {
        "recv_x": torch.stack(rows) if rows else torch.empty(0, H, dtype=dtype),
        "counts": torch.tensor(counts, dtype=torch.int64),
        "src_rank": torch.tensor(src_rank, dtype=torch.int64),
        "src_token": torch.tensor(src_token, dtype=torch.int64),
        "weight": torch.stack(weight).to(weight_dtype) if weight else torch.empty(0, dtype=weight_dtype),
    }


def count_matrix(scenario, world_size: int, rows_on_the_wire: str = "token") -> torch.Tensor:
    """[W, W]: rows rank p must send to rank q: a token once per rank owning any of its experts ("token"),
    or once per (token, expert) pair ("pair")."""
    x, ids, _, _ = problem_of(scenario)
    e_local = scenario[2] // world_size
    matrix = torch.zeros(world_size, world_size, dtype=torch.int64)
    for t in range(x.shape[0]):
        owners = (ids[t].long() // e_local).tolist()
        for q in set(owners) if rows_on_the_wire == "token" else owners:
            matrix[int(x[t, 0]), q] += 1
    return matrix


def check_layout(got: dict, scenario, world_size: int, q: int) -> None:
    """Rank q's result of one layout scenario against the single-process expectation, in got's dtype."""
    _, tokens, num_experts, _, _, integer, with_shared = scenario
    dtype = got["dtype"]
    x, ids, w, shared = problem_of(scenario, dtype)
    matrix = count_matrix(scenario, world_size, got["rows_on_the_wire"])
    want = expected_receive(scenario, world_size, q, dtype)
    assert torch.equal(got["recv_x"], want["recv_x"]), "received rows differ"
    for key in ("counts", "src_rank", "src_token", "weight"):
        assert got[key].dtype == want[key].dtype, f"{key} is {got[key].dtype}, expected {want[key].dtype}"
        assert torch.equal(got[key], want[key]), f"{key} differs: {got[key].tolist()} != {want[key].tolist()}"
    assert torch.equal(got["offsets"], torch.cat([torch.zeros(1, dtype=torch.int64), want["counts"].cumsum(0)]))
    # on the wire: each token once per destination rank (or once per expert), no more
    assert torch.equal(got["send_counts"], matrix[q]), f"send counts {got['send_counts']} != {matrix[q]}"
    assert torch.equal(got["recv_counts"], matrix[:, q]), f"recv counts {got['recv_counts']} != {matrix[:, q]}"
    assert got["wire_rows"] == int(matrix[q].sum())
    if got["rows_on_the_wire"] == "token":
        pairs = set(zip(got["src_rank"].tolist(), got["src_token"].tolist()))
        assert len(pairs) == int(matrix[:, q].sum()), "distinct tokens received != tokens on the wire"
    # identity experts: y = sum_k w_k x (+ shared_out)
    mine = rank_slice(tokens, q)
    expected = (w[mine].double()[:, :, None] * x[mine].double()[:, None, :]).sum(1)
    if with_shared:
        expected = expected + shared[mine].double()
    if integer:
        assert torch.equal(got["y"], expected.to(dtype)), "identity combine is not exact"
    else:
        assert_close_to_reference(got["y"], expected, dtype, "identity combine")
    if got["path"] == "padded":  # M slots per pair of ranks: the fixed capacity, else the largest count
        assert got["slots_per_peer"] == (got["capacity"] if got["capacity"] is not None else int(matrix.max()))
    if got["path"] == "symmetric":  # capacity slots per (source rank, expert)
        assert got["slots_per_peer"] == num_experts // world_size * got["capacity"]
    if got["padding_fraction"] is not None:
        slots = world_size * world_size * got["slots_per_peer"]
        fraction = (slots - int(matrix.sum())) / slots if slots else 0.0
        assert abs(got["padding_fraction"] - fraction) < 1e-12, f"padding_fraction {got['padding_fraction']}"
        assert got["last_padding_fraction"] == got["padding_fraction"]
        all_padding = int(matrix.sum()) == 0  # a fixed capacity and nothing sent
        assert 0.0 <= got["padding_fraction"] < 1.0 or all_padding, f"padding_fraction {got['padding_fraction']}"


def check_ep(y: torch.Tensor, scenario, problem, world_size: int, mine: slice) -> None:
    """This rank's rows of ep_forward against reference_moe on every rank's tokens."""
    config = problem.config
    reference = reference_moe(problem.x, problem.weights, config)
    if scenario[0] == "all-to-rank-0":  # the case is what it says: every token's experts live on rank 0
        assert int(reference.routing.topk_ids.max()) < config.num_experts // world_size
    assert y.dtype == F32 and y.shape == (mine.stop - mine.start, config.hidden_size)
    assert_close_to_reference(y, reference.y[mine], F32, "ep_forward")


def single_process_forward(problem):
    weights, config = problem.weights, problem.config
    routing = route(problem.router_logits(), config, weights.score_correction_bias)
    y = EXPERT_BACKENDS.get("grouped_loop").fn(problem.x, routing.topk_ids, routing.topk_weights, weights)
    if weights.shared_gate_up is not None:
        for w_gate_up, w_down in zip(weights.shared_gate_up, weights.shared_down):
            y = y + swiglu_mlp(problem.x, w_gate_up, w_down)
    return y


def failures(world_size: int, prefix: str) -> dict:
    """The checks under prefix that did not pass, by rank; fails when there is no such check."""
    results = world(world_size)
    ran = [
        (q, key, value) for q, r in enumerate(results) for key, value in r["checks"].items() if key.startswith(prefix)
    ]
    assert ran, f"no check {prefix!r} ran"
    return {f"rank {q} {key}": value for q, key, value in ran if value != "ok"}


CASES = [(ws, path) for ws in WORLD_SIZES for path in paths_for(ws)]
IDS = [f"{ws}-ranks-{path}" for ws, path in CASES]


def test_every_path_runs_somewhere():
    assert {"nccl", "padded", "skip_a2a", "symmetric"} <= set(DISPATCHERS.names())
    # test_nvshmem_triton.py, test_fixed_messages.py, test_padded_triton.py, test_symmetric_triton.py,
    # test_gpu_dispatchers.py
    gpu_only = {"nvshmem_triton", "nvshmem_triton_graph", "padded_triton", "symm_mem"}
    gpu_only |= {"symmetric_triton", "symmetric_triton_graph"}
    assert paths_for(1) == [n for n in DISPATCHERS.names() if n not in gpu_only]
    assert "skip_a2a" not in paths_for(2)


@pytest.mark.parametrize(("world_size", "path"), CASES, ids=IDS)
def test_layout_and_identity_combine(world_size, path):
    assert failures(world_size, f"layout/{path}/") == {}


@pytest.mark.parametrize(("world_size", "path"), CASES, ids=IDS)
def test_float64_dispatch_carries_float64_router_weights(world_size, path):
    """Every weight received and every identity combine at float64's tolerance: a float32 hop on the wire (the
    weights' 53 bits cut to 24) moves the combine by ~1e-8, far above it."""
    assert failures(world_size, f"float64/{path}/") == {}


@pytest.mark.parametrize(("world_size", "path"), CASES, ids=IDS)
def test_repeated_calls_reuse_buffers_without_stale_rows(world_size, path):
    assert failures(world_size, f"repeat/{path}/") == {}


@pytest.mark.parametrize(("world_size", "path"), CASES, ids=IDS)
def test_ep_forward_matches_the_single_process_oracle(world_size, path):
    assert failures(world_size, f"ep/{path}/") == {}


def test_skip_a2a_on_one_rank_equals_the_single_process_forward():
    assert failures(1, "single/skip_a2a/") == {}


@pytest.mark.parametrize(("world_size", "path"), CASES, ids=IDS)
def test_argument_errors_are_raised_before_any_communication(world_size, path):
    for q, result in enumerate(world(world_size)):
        errors = result["errors"][path]
        assert errors["above max_tokens"].startswith("ValueError") and "max_tokens=4" in errors["above max_tokens"]
        assert errors["id out of range"].startswith("ValueError") and "topk_ids" in errors["id out of range"]
        assert errors["float ids"].startswith("TypeError")
        assert errors["x dtype"].startswith("TypeError")
        assert errors["weights shape"].startswith("ValueError")
        assert errors["expert_out shape"].startswith("ValueError")
        if world_size > 1:
            message = errors["indivisible experts"]
            assert message.startswith("ValueError"), f"rank {q}: {message}"
            assert f"num_experts ({2 * world_size + 1})" in message and f"world size ({world_size})" in message


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_skip_a2a_refuses_more_than_one_rank(world_size):
    for result in world(world_size):
        message = result["errors"]["skip_a2a"]["more than one rank"]
        assert message.startswith("ValueError") and "one rank" in message


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_padded_fixed_capacity_raises_on_every_rank_instead_of_dropping(world_size):
    over, fits = capacity_scenarios(world_size, SEED)
    assert int(count_matrix(over, world_size).max()) > CAPACITY  # the case overflows
    assert int(count_matrix(fits, world_size).max()) <= CAPACITY
    for q, result in enumerate(world(world_size)):
        message = result["errors"]["capacity overflow"]
        assert message.startswith("ValueError") and f"capacity {CAPACITY}" in message, f"rank {q}: {message}"
    assert failures(world_size, "capacity/") == {}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_capacity_holds_exactly_capacity_and_refuses_one_pair_more(world_size):
    """At exactly the capacity nothing is dropped or refused; one pair more (one (rank, rank) pair for padded, one
    (rank, expert) for symmetric) raises on every rank, naming the rank, or drops exactly that pair and counts it."""
    last, over = world_size - 1, CAPACITY + 1
    assert failures(world_size, "edge/padded/") == failures(world_size, "edge/symmetric-") == {}
    for q, result in enumerate(world(world_size)):
        for name in ("padded", "symmetric-raise", "symmetric-drop"):
            assert result["drops"][f"{name}/at-capacity"] == (0, 0), f"rank {q} {name}"
        assert result["drops"]["symmetric-drop/one-over"] == (int(q == last), 1), f"rank {q}"
        message = result["errors"]["edge/padded/one-over"]
        assert message.startswith("ValueError"), f"rank {q}: {message}"
        assert f"rank {last} would send {over} tokens to rank 0, above the fixed capacity {CAPACITY}" in message
        message = result["errors"]["edge/symmetric-raise/one-over"]
        assert message.startswith("ValueError"), f"rank {q}: {message}"
        assert f"rank {last} routed {over} tokens to expert 0, above the capacity {CAPACITY}" in message


@pytest.mark.parametrize(("world_size", "path"), CASES, ids=IDS)
def test_max_tokens_holds_exactly_max_tokens_and_refuses_one_more(world_size, path):
    assert failures(world_size, f"edge/max_tokens/{path}/") == {}
    for q, result in enumerate(world(world_size)):
        message = result["errors"][f"edge/max_tokens/{path}/one-over"]
        assert message.startswith("ValueError"), f"rank {q}: {message}"
        assert f"{CAPACITY + 1} tokens, above max_tokens={CAPACITY}" in message, f"rank {q}: {message}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_symmetric_overflow_raises_on_every_rank_or_is_dropped_and_counted(world_size):
    over, _ = capacity_scenarios(world_size, SEED)
    assert int(count_matrix(over, world_size, "pair").max()) > CAPACITY
    for q, result in enumerate(world(world_size)):
        message = result["errors"]["symmetric overflow"]
        assert message.startswith("ValueError") and f"capacity {CAPACITY}" in message, f"rank {q}: {message}"
    assert failures(world_size, "symmetric-capacity/") == {}
