"""put_fixed_messages and wait_for_messages: every rank's message q lands in block (its rank) of rank q's buffer.

Simulated groups: one process plays W ranks over one heap (moekit.testing.simulated_heap), every rank's put
before any rank's wait (the waits spin until signalled): on the CPU under TRITON_INTERPRET=1, on one GPU
with the kernels compiled. Each step poisons every receive buffer (NaN, -7), sends random messages (never
zero) of that step's sizes, rows and int64 metadata in one launch (or the rows alone), and checks on every
rank q that block p holds exactly what rank p sent to q, that everything past the message is still poison,
and that the flags show the step's epoch. The dispatcher on it: test_padded_triton.py, test_gpu_dispatchers.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.testing.simulated_heap import SimulatedGroup

ROW_CAPACITY, META_CAPACITY = 40, 24  # elements per block of the receive buffers
META_POISON = -7


@pytest.fixture(params=[torch.float32, torch.float16, torch.bfloat16], ids=str)
def dtype(request, skip_unless_triton_runs):
    skip_unless_triton_runs(request.param)
    return request.param


@dataclass
class RankBuffers:
    """One simulated rank's receive buffers ([W, capacity] each), flags int32 [W], their tables, and done."""

    rows: torch.Tensor
    rows_table: torch.Tensor
    meta: torch.Tensor
    meta_table: torch.Tensor
    flags: torch.Tensor
    flag_table: torch.Tensor
    done: torch.Tensor


def make_group(W, dtype, device) -> list[RankBuffers]:
    group = SimulatedGroup(W, device)
    ranks = []
    for p in range(W):
        heap = group.rank(p)
        rows, meta, flags = (
            heap.empty((W, ROW_CAPACITY), dtype),
            heap.empty((W, META_CAPACITY), torch.int64),
            heap.empty((W,), torch.int32),
        )
        ranks.append(RankBuffers(*rows, *meta, *flags, torch.zeros(1, dtype=torch.int32, device=device)))
    for rank in ranks:
        rank.flags.zero_()
    return ranks


def run_step(ranks, epoch, row_elems, meta_elems, with_meta, block, programs, g):
    """Poison, every rank's put, every rank's wait; returns what each rank sent: (rows [W, m], meta [W, m'])."""
    from moekit.kernels.fixed_messages import put_fixed_messages, wait_for_messages

    W, device, dtype = len(ranks), ranks[0].rows.device, ranks[0].rows.dtype
    for rank in ranks:
        rank.rows.fill_(float("nan"))
        rank.meta.fill_(META_POISON)
    sent = [
        (
            (torch.rand(W, row_elems, generator=g) + 0.5).to(device, dtype),
            torch.randint(1, 2**40, (W, meta_elems), generator=g).to(device),
        )
        for _ in ranks
    ]
    for p, (rank, (rows, meta)) in enumerate(zip(ranks, sent)):
        messages = [(rows, rank.rows_table, ROW_CAPACITY)]
        if with_meta:
            messages.append((meta, rank.meta_table, META_CAPACITY))
        put_fixed_messages(messages, rank.flag_table, rank.done, epoch, p, block=block, programs_per_rank=programs)
    for rank in ranks:
        wait_for_messages(rank.flags, epoch)
    return sent


def check_step(ranks, sent, epoch, with_meta):
    for q, rank in enumerate(ranks):
        assert (rank.flags == epoch).all() and rank.done.item() == 0, f"rank {q}: flags or the rearmed counter"
        for p, (rows, meta) in enumerate(sent):
            m = rows.shape[1]
            assert torch.equal(rank.rows[p, :m], rows[q]), f"rank {q}: rows from rank {p}"
            assert rank.rows[p, m:].isnan().all(), f"rank {q}: rows past rank {p}'s message were written"
            m = meta.shape[1] if with_meta else 0
            assert torch.equal(rank.meta[p, :m], meta[q, :m]), f"rank {q}: metadata from rank {p}"
            assert (rank.meta[p, m:] == META_POISON).all(), f"rank {q}: metadata past rank {p}'s message"


@st.composite
def scenarios(draw):
    sizes = [0, 1, ROW_CAPACITY]
    steps = [
        (
            draw(st.sampled_from(sizes) | st.integers(0, ROW_CAPACITY)),
            draw(st.sampled_from([0, META_CAPACITY]) | st.integers(0, META_CAPACITY)),
            draw(st.booleans()),
        )
        for _ in range(3)
    ]
    block = draw(st.sampled_from([16, 32, 4096]))  # 16: a program moves several strided chunks
    return draw(st.integers(1, 4)), steps, block, draw(st.none() | st.integers(1, 3)), draw(st.integers(0, 2**31 - 1))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=12)
@given(case=scenarios())
def test_every_rank_receives_every_message(device, dtype, case):
    W, steps, block, programs, seed = case
    g = torch.Generator().manual_seed(seed)
    ranks = make_group(W, dtype, device)
    for epoch, (row_elems, meta_elems, with_meta) in enumerate(steps, start=1):
        sent = run_step(ranks, epoch, row_elems, meta_elems, with_meta, block, programs, g)
        check_step(ranks, sent, epoch, with_meta)


def test_sizes_from_empty_to_capacity(device, dtype):
    """On 3 ranks: the empty message, the full block and sizes between, one after the other."""
    g = torch.Generator().manual_seed(5)
    ranks = make_group(3, dtype, device)
    for epoch, (row_elems, meta_elems) in enumerate([(0, 0), (ROW_CAPACITY, META_CAPACITY), (7, 0), (0, 5)], 1):
        sent = run_step(ranks, epoch, row_elems, meta_elems, True, 16, None, g)
        check_step(ranks, sent, epoch, True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"messages": []}, "messages must hold one or two"),
        ({"send": torch.zeros(3, 4)}, r"send must be contiguous \[W=2"),
        ({"table": torch.zeros(2, dtype=torch.int32)}, "recv_table must be int64"),
        ({"block_elems": 3}, "block_elems 3 is below the message's 4"),
        ({"my_rank": 2}, r"my_rank must be in \[0, 2\)"),
        ({"done": torch.zeros(2, dtype=torch.int32)}, "done must be int32"),
        ({"block": 48}, "block must be a power of two"),
    ],
)
def test_argument_errors_before_any_kernel(change, message):
    from moekit.kernels.fixed_messages import put_fixed_messages

    send = change.get("send", torch.zeros(2, 4))
    table = change.get("table", torch.zeros(2, dtype=torch.int64))
    messages = change.get("messages", [(send, table, change.get("block_elems", 4))])
    done, flag_table = change.get("done", torch.zeros(1, dtype=torch.int32)), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        put_fixed_messages(messages, flag_table, done, 1, change.get("my_rank", 0), block=change.get("block", 16))
