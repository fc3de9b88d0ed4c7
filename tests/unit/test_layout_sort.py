"""layout_sort, the one-program Triton layout of a small batch, against moekit.permute's torch layout: exactly.

On the CPU it runs under the Triton interpreter (TRITON_INTERPRET=1) and skips without it; on CUDA it compiles,
and expert_layout takes it there, so the CUDA case also checks that dispatch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.kernels.layout_sort import MAX_ASSIGNMENTS, MAX_EXPERTS, fits_layout_sort, layout_sort
from moekit.permute import expert_layout, expert_layout_torch


def _torch_layout(topk_ids: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    layout = expert_layout_torch(topk_ids, num_experts)
    return [t.cpu() for t in (layout.sorted_assignments, layout.assignment_rows, layout.expert_counts,
                              layout.expert_offsets)]  # fmt: skip


def _ids(num_tokens: int, num_experts: int, top_k: int, one_expert_set: bool, seed: int) -> torch.Tensor:
    """[T, K] distinct ids per token, random (or every token on the same K experts)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts, generator=g)[:top_k] for _ in range(1 if one_expert_set else num_tokens)]
    return torch.stack(rows * (num_tokens if one_expert_set else 1)).to(torch.int32)


def _check(topk_ids: torch.Tensor, num_experts: int) -> None:
    expected = _torch_layout(topk_ids, num_experts)
    for got, want in zip(layout_sort(topk_ids, num_experts), expected, strict=True):
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)
    if topk_ids.is_cuda:  # expert_layout takes the kernel on CUDA
        layout = expert_layout(topk_ids, num_experts)
        got = [layout.sorted_assignments, layout.assignment_rows, layout.expert_counts, layout.expert_offsets]
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, expected, strict=True))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # triton_device only skips
@given(
    num_experts=st.integers(1, 300),
    data=st.data(),
    one_expert_set=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_the_torch_layout(triton_device, num_experts, data, one_expert_set, seed):
    # at most 320 assignments: the interpreter sorts slowly (the largest batch has a test of its own)
    top_k = data.draw(st.integers(1, min(num_experts, 8)), label="top_k")
    num_tokens = data.draw(st.integers(1, 40), label="num_tokens")
    _check(_ids(num_tokens, num_experts, top_k, one_expert_set, seed).to(triton_device), num_experts)


@pytest.mark.parametrize(
    "num_tokens, top_k, num_experts",
    [(1, 1, 1), (1, 1, 8), (1, 8, 8), (33, 1, 1), (5, 4, MAX_EXPERTS)],
    ids=["one assignment", "one token", "K = E", "all on one expert", "most of 1024 experts empty"],
)
def test_edge_cases(triton_device, num_tokens, top_k, num_experts):
    _check(_ids(num_tokens, num_experts, top_k, False, 5).to(triton_device), num_experts)


def test_int64_ids_and_the_largest_batch(triton_device):
    _check(_ids(MAX_ASSIGNMENTS // 8, 64, 8, False, 3).long().to(triton_device), 64)


@pytest.mark.parametrize("num_assignments, num_experts", [(0, 8), (MAX_ASSIGNMENTS + 1, 8), (8, MAX_EXPERTS + 1)])
def test_refuses_what_one_program_cannot_hold(num_assignments, num_experts):
    assert not fits_layout_sort(num_assignments, num_experts)
    with pytest.raises(ValueError, match="layout_sort takes"):
        layout_sort(torch.zeros(num_assignments, 1, dtype=torch.int32), num_experts)
