"""The symmetric layout's device bookkeeping (moekit.kernels.slot_plan) against its torch definition.

plan_pairs against moekit.ep.symmetric.pair_slots and pair_summary: every pair's position (-1 above the
capacity), token and (token, weight bits), and the signal counts, for routings Hypothesis draws (T = 0,
duplicate experts in a token, all pairs on one expert, K = E, more pairs than one program ranks).
receive_rows against a listing in Python of random arrivals in a ring slot, with padding rows after them.
On the CPU under TRITON_INTERPRET=1, on CUDA compiled; conftest's triton_device skips elsewhere, before
Hypothesis runs an example.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moekit.ep.symmetric import pair_slots, pair_summary

SETTINGS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=25)


@st.composite
def routings(draw):
    """(topk_ids [T, K] int32 or int64, topk_weights [T, K], E, W, C)."""
    W = draw(st.integers(1, 4))
    E = W * draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    T = draw(st.sampled_from([0, 1, 7, 9, 40]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    routing = draw(st.sampled_from(["distinct", "repeats", "one expert"]))
    if routing == "distinct":
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    elif routing == "repeats":
        ids = torch.randint(0, E, (T, K), generator=g)
    else:
        ids = torch.full((T, K), draw(st.integers(0, E - 1)))
    ids = ids.to(draw(st.sampled_from([torch.int32, torch.int64])))
    C = draw(st.integers(1, max(1, T * K)))
    return ids, torch.rand(T, K, generator=g) + 0.1, E, W, C


@SETTINGS
@example(routing=(torch.randint(0, 6, (100, 6)), torch.rand(100, 6), 6, 2, 50))  # 600 pairs: ten programs
@given(routing=routings())
def test_plan_pairs_matches_pair_slots(triton_device, routing):
    from moekit.kernels.slot_plan import plan_pairs

    device = triton_device
    ids, weights, E, W, C = routing
    T, K = ids.shape
    done = torch.zeros(1, dtype=torch.int32, device=device)
    position, token, meta, signal_counts = plan_pairs(ids.to(device), weights.to(device), E, C, W, done)

    pairs = pair_slots(ids, E)
    want_position = torch.where(pairs.slot < C, pairs.expert * C + pairs.slot, -1)
    assert torch.equal(position.cpu(), want_position)
    assert torch.equal(token.cpu(), torch.arange(T * K) // K)
    assert torch.equal(meta[:, 0].cpu(), (torch.arange(T * K) // K).to(torch.int32))
    assert torch.equal(meta[:, 1].cpu(), weights.reshape(-1).view(torch.int32))
    per_rank = pairs.counts.clamp(max=C).view(W, E // W)
    want_counts = torch.cat([pair_summary(pairs.counts, C).expand(W, 4), per_rank], dim=1).to(torch.int32)
    assert torch.equal(signal_counts.cpu(), want_counts)
    assert done.item() == 0, "the plan's counter is re-armed for the next call"


@SETTINGS
@given(
    W=st.integers(1, 3),
    E_local=st.integers(1, 5),
    C=st.integers(1, 6),
    ring_slots=st.integers(1, 3),
    epoch=st.integers(0, 7),
    padding=st.sampled_from([0, 1, 300]),
    seed=st.integers(0, 2**16),
)
def test_receive_rows_lists_arrivals_by_expert_then_source(triton_device, W, E_local, C, ring_slots, epoch,
                                                           padding, seed):  # fmt: skip
    from moekit.kernels.slot_plan import receive_rows

    device = triton_device
    g = torch.Generator().manual_seed(seed)
    first_count = 3
    flags = torch.randint(-5, 5, (ring_slots, W, first_count + E_local), generator=g, dtype=torch.int32)
    ring = epoch % ring_slots
    pairs = torch.randint(0, C + 1, (W, E_local), generator=g, dtype=torch.int32)  # pairs from p for expert e
    flags[ring, :, first_count:] = pairs
    slots = W * E_local * C
    meta = torch.randint(-(2**30), 2**30, (ring_slots, slots, 2), generator=g, dtype=torch.int32)
    R = int(pairs.sum())
    epoch_on_device = torch.tensor([epoch], dtype=torch.int32, device=device)
    got = receive_rows(flags.to(device), first_count, meta.to(device), epoch_on_device, C, R + padding)
    slot_of_row, src, src_token, weight, counts, offsets = (t.cpu() for t in got)
    for name, t, pad in [("slot", slot_of_row, -1), ("src", src, -1), ("token", src_token, -1), ("weight", weight, 0)]:
        assert (t[R:] == pad).all(), f"padding rows' {name}"
    slot_of_row, src, src_token, weight = (t[:R] for t in (slot_of_row, src, src_token, weight))

    want = [(p * E_local + e) * C + s for e in range(E_local) for p in range(W) for s in range(int(pairs[p, e]))]
    assert slot_of_row.tolist() == want
    assert src.tolist() == [slot // (E_local * C) for slot in want]
    assert torch.equal(src_token, meta[ring, want, 0].long())
    assert torch.equal(weight.view(torch.int32), meta[ring, want, 1])  # the bits (random ones include NaNs)
    assert torch.equal(counts, pairs.sum(0).long())
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.int64), pairs.sum(0).long().cumsum(0)]))
