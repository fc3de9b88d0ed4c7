"""Routed tokens sent to the rank that owns their expert with all_to_all_single, checked row by row
against a single-process computation. Each row carries its provenance (source rank, token index)."""

import pytest
import torch
import torch.distributed as dist

from moekit import MoEConfig, route
from moekit.permute import expert_layout
from moekit.testing.spawn import spawn_ranks

H = 6


def global_problem(world_size, tokens_per_rank, num_experts, seed):
    """Tokens of every rank [sum T_r, H] (column 0 = source rank, 1 = token index) and their routing."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for rank, T in enumerate(tokens_per_rank):
        x = torch.randn(T, H, generator=g)
        x[:, 0], x[:, 1] = rank, torch.arange(T)
        rows.append(x)
    x = torch.cat(rows)
    config = MoEConfig(hidden_size=H, ffn_size=4, num_experts=num_experts, top_k=2)
    logits = torch.randn(x.shape[0], num_experts, generator=g)
    logits[:, 0] += 3.0 * (x[:, 0] == world_size - 1)  # skew: the last rank's tokens favour expert 0
    return x, route(logits, config)


def exchange(rank, world_size, tokens_per_rank, num_experts, seed):
    x, routing = global_problem(world_size, tokens_per_rank, num_experts, seed)
    start = sum(tokens_per_rank[:rank])
    mine = slice(start, start + tokens_per_rank[rank])
    x, ids = x[mine], routing.topk_ids[mine]
    layout = expert_layout(ids, num_experts)
    send_counts = layout.expert_counts.view(world_size, -1).sum(1)  # experts are split evenly, in order
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send = torch.cat([x[layout.sorted_token_ids], ids.flatten()[layout.sorted_assignments, None].double()], 1)
    received = send.new_empty(int(recv_counts.sum()), H + 1)
    dist.all_to_all_single(received, send, recv_counts.tolist(), send_counts.tolist())
    return received


@pytest.mark.parametrize(
    ("world_size", "tokens_per_rank", "num_experts"),
    [(2, [13, 7], 4), (3, [5, 0, 9], 6), (4, [1, 8, 3, 16], 8)],
    ids=["2-ranks", "3-ranks-one-empty", "4-ranks"],
)
def test_routed_tokens_arrive_where_the_single_process_layout_says(world_size, tokens_per_rank, num_experts):
    seed = 1234
    received = spawn_ranks(exchange, world_size, tokens_per_rank, num_experts, seed, timeout_s=120)
    x, routing = global_problem(world_size, tokens_per_rank, num_experts, seed)
    per_rank = num_experts // world_size
    for q in range(world_size):
        expected = [  # by source rank, then expert, then token: the order the sender's layout gives
            torch.cat([x[t], torch.tensor([float(e)], dtype=torch.float64)])
            for src in range(world_size)
            for e in range(q * per_rank, (q + 1) * per_rank)
            for t in range(x.shape[0])
            if int(x[t, 0]) == src and e in routing.topk_ids[t].tolist()
        ]
        expected = torch.stack(expected) if expected else torch.empty(0, H + 1, dtype=torch.float64)
        assert torch.equal(received[q], expected), f"rank {q} received other rows than the layout says"
