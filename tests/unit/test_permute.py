"""The expert-sorted layout is checked exactly: counts, offsets, order, inverse, and the round trip."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.permute import expert_layout, permute_tokens, unpermute_reduce


@st.composite
def routings(draw):
    E = draw(st.integers(1, 10))
    K = draw(st.integers(1, E))
    T = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 40)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = [torch.randperm(E, generator=g)[:K] for _ in range(T)]
    if draw(st.booleans()) and T:  # every token on the same K experts
        ids = [ids[0]] * T
    return (torch.stack(ids) if T else torch.empty(0, K)).to(torch.int32), E, g


@given(routings())
def test_layout_is_exact(routing):
    topk_ids, E, g = routing
    T, K = topk_ids.shape
    layout = expert_layout(topk_ids, E)
    flat = topk_ids.flatten().long()
    assert layout.expert_counts.tolist() == [int((flat == e).sum()) for e in range(E)]
    assert layout.expert_offsets.tolist() == [0] + torch.cumsum(layout.expert_counts, 0).tolist()
    sorted_experts = flat[layout.sorted_assignments]
    assert bool((sorted_experts[1:] >= sorted_experts[:-1]).all())
    for e in range(E):  # within an expert, token order is kept
        start, end = layout.expert_offsets[e], layout.expert_offsets[e + 1]
        tokens = layout.sorted_token_ids[start:end]
        assert bool((tokens[1:] > tokens[:-1]).all()) and bool((sorted_experts[start:end] == e).all())
    assert torch.equal(layout.sorted_assignments[layout.inverse], torch.arange(T * K))

    x = torch.randn(T, 5, generator=g)
    rows = permute_tokens(x, layout)
    assert torch.equal(rows, x[layout.sorted_token_ids])
    weights = torch.rand(T, K, generator=g) + 0.1
    expected = (x.unsqueeze(1) * weights.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(unpermute_reduce(rows, layout, weights), expected)
    ones = torch.ones(T, K)  # without weights the round trip gives K * x exactly for small ints
    ints = torch.randint(-8, 8, (T, 5), generator=g).float()
    assert torch.equal(unpermute_reduce(permute_tokens(ints, layout), layout, ones), ints * K)
