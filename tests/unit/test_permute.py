"""The expert-sorted layout is checked exactly: counts, offsets, order, rows, padding, and the round trip."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.permute import expert_layout, permute_tokens, unpermute_reduce


@st.composite
def routings(draw):
    """(topk_ids [T, K] int32, E, generator): distinct ids per token, sometimes every token on the same experts."""
    E = draw(st.integers(1, 10))
    K = draw(st.integers(1, E))
    T = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 40)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = [torch.randperm(E, generator=g)[:K] for _ in range(T)]
    if draw(st.booleans()) and T:
        ids = [ids[0]] * T
    return (torch.stack(ids) if T else torch.empty(0, K)).to(torch.int32), E, g


@given(routings(), st.sampled_from([1, 4, 16]))
def test_layout_is_exact(routing, pad_to):
    topk_ids, E, g = routing
    T, K = topk_ids.shape
    layout = expert_layout(topk_ids, E, pad_to=pad_to)
    flat = topk_ids.flatten().long()
    counts = [int((flat == e).sum()) for e in range(E)]
    assert layout.expert_counts.tolist() == counts
    blocks = [-(-c // pad_to) * pad_to for c in counts]
    assert layout.expert_offsets.tolist() == [sum(blocks[:e]) for e in range(E + 1)]
    assert layout.num_rows >= layout.expert_offsets[-1] and (layout.num_tokens, layout.top_k) == (T, K)
    sorted_experts = flat[layout.sorted_assignments]
    assert bool((sorted_experts[1:] >= sorted_experts[:-1]).all())
    for e in range(E):  # within an expert: token order, rows from the expert's first row on
        start = int(layout.expert_offsets[e])
        mine = layout.sorted_assignments[sorted_experts == e]
        assert torch.equal(layout.assignment_rows[mine], torch.arange(start, start + counts[e]))
        assert bool((mine[1:] > mine[:-1]).all())
    assert torch.equal(layout.sorted_token_ids, layout.sorted_assignments // max(K, 1))

    x = torch.randn(T, 5, generator=g)
    rows = permute_tokens(x, layout)
    assert rows.shape == (layout.num_rows, 5)
    assert torch.equal(rows[layout.assignment_rows], x.repeat_interleave(K, dim=0))
    padding = torch.ones(layout.num_rows, dtype=torch.bool)
    padding[layout.assignment_rows] = False
    assert bool((rows[padding] == 0).all())

    weights = torch.rand(T, K, generator=g) + 0.1
    expected = (x.unsqueeze(1) * weights.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(unpermute_reduce(rows, layout, weights), expected)
    ints = torch.randint(-8, 8, (T, 5), generator=g).float()  # exact: small integers
    assert torch.equal(unpermute_reduce(permute_tokens(ints, layout), layout, None), ints * K)


def test_bad_pad_to():
    import pytest

    with pytest.raises(ValueError, match="pad_to must be >= 1"):
        expert_layout(torch.zeros(1, 1, dtype=torch.int32), 2, pad_to=0)
