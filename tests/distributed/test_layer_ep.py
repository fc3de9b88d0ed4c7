"""MoELayer with a dispatcher on gloo ranks equals the single-process oracle on all ranks' tokens."""

import pytest
import torch

from moekit import MoEConfig, make_problem
from moekit.layer import MoELayer
from moekit.reference import reference_moe
from moekit.testing import assert_close_to_reference
from moekit.testing.spawn import spawn_ranks

CONFIG = MoEConfig(
    hidden_size=24,
    ffn_size=16,
    num_experts=8,
    top_k=3,
    num_shared_experts=1,
    router="grouped_topk",
    n_group=4,
    topk_group=2,
    dtype=torch.float32,
)
TOKENS = [7, 0, 13, 5]


def layer_rank(rank, world_size, dispatcher):
    problem = make_problem(CONFIG, sum(TOKENS[:world_size]), seed=5)
    start = sum(TOKENS[:rank])
    layer = MoELayer(CONFIG, dispatcher=dispatcher, weights=problem.weights, max_tokens=32)
    return layer(problem.x[start : start + TOKENS[rank]])


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dispatcher", ["nccl", "padded"])
def test_expert_parallel_layer_matches_oracle(dispatcher, world_size):
    y = torch.cat(spawn_ranks(layer_rank, world_size, dispatcher, timeout_s=120))
    problem = make_problem(CONFIG, sum(TOKENS[:world_size]), seed=5)
    assert_close_to_reference(y, reference_moe(problem.x, problem.weights, CONFIG).y, CONFIG.dtype, dispatcher)
