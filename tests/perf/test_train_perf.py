"""Training steps (forward + backward of the routed experts, moekit bench train's step) of the fast backends that
train (bench train's default paths) against the torchtitan-style peer (torch._grouped_mm under autograd, index
gather and index_add) on the same routed tokens."""

import pytest

from moekit import MoEConfig, make_problem
from moekit.bench.flops import routed_expert_flops
from moekit.bench.train import PEER, path_support, train_step
from moekit.bench.train_command import DEFAULT_PATHS

from sizes import DTYPE, EXPERT_SHAPE, EXPERT_TOKENS

pytestmark = pytest.mark.perf

CONFIG = MoEConfig(**EXPERT_SHAPE, router="topk_softmax", dtype=DTYPE)


@pytest.mark.benchmark(group="train")
@pytest.mark.parametrize("backend", [path for path in DEFAULT_PATHS if path != PEER])
def test_training_step(backend, perf, perf_device):
    for path in (backend, PEER):
        ok, reason = path_support(path, perf_device, DTYPE)
        if not ok:
            pytest.skip(reason)
    problem = make_problem(CONFIG, EXPERT_TOKENS, seed=0, device=perf_device)
    fast, reference = train_step(problem, backend), train_step(problem, PEER)
    flops = 3 * routed_expert_flops(EXPERT_TOKENS, CONFIG)
    perf(fast.step, reference.step, reference_name=PEER, flops=flops)
