import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.routing import load_stats


@given(
    T=st.integers(0, 50),
    E=st.integers(1, 9),
    capacity=st.one_of(st.none(), st.integers(0, 20)),
    seed=st.integers(0, 2**31 - 1),
)
def test_load_stats_match_a_python_count(T, E, capacity, seed):
    K = min(2, E)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K)
    ids = ids.to(torch.int32)
    stats = load_stats(ids, E, capacity)
    counts = [sum(row.count(e) for row in ids.tolist()) for e in range(E)]
    assert stats.tokens_per_expert.tolist() == counts
    assert stats.dropped == (0 if capacity is None else sum(max(0, c - capacity) for c in counts))
    if T:
        mean = sum(counts) / E
        assert stats.max_over_mean == pytest.approx(max(counts) / mean)
        var = sum((c - mean) ** 2 for c in counts) / E
        assert stats.cv == pytest.approx(var**0.5 / mean)
    else:
        assert (stats.max_over_mean, stats.cv) == (1.0, 0.0)


def test_negative_capacity_is_an_error():
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        load_stats(torch.zeros(1, 1, dtype=torch.int32), 2, capacity=-1)
