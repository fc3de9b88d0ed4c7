"""MoELayer with a dispatcher on gloo ranks equals the float64 oracle on all ranks' tokens: every router x
expert backend x dispatcher that runs on the CPU, synchronous and overlapped; mismatched ranks raise.

One spawn per world size runs every combination on every rank; ranks return their outputs, the tests
compare them with the oracle here (each rank's tokens routed as one batch, as the layer does).
"""

import functools

import pytest
import torch

from moekit import MoEConfig, make_problem
from moekit.ep import DISPATCHERS
from moekit.experts import EXPERT_BACKENDS
from moekit.layer import MoELayer
from moekit.reference import reference_moe
from moekit.routing import ROUTERS
from moekit.testing import assert_close_to_reference
from moekit.testing.spawn import spawn_ranks

CPU, F32, F64 = torch.device("cpu"), torch.float32, torch.float64
BASE = dict(hidden_size=32, ffn_size=16, num_experts=12, top_k=3, num_shared_experts=1, dtype=F32)
ROUTER_OPTIONS = {"grouped_topk": dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)}
TOKENS = [7, 0, 13, 5]
# (shared_overlap, chunks, own_first): the synchronous layer first
SYNC = (False, 1, False)
OVERLAPS = [SYNC, (True, 1, False), (False, 3, False), (True, 4, False), (False, 1, True), (True, 3, True)]
SEED = 5
FLOAT64_ROUTER = "grouped_topk"  # the DeepSeek-V3 router: its weights are renormalised and scaled


def config_of(router: str, dtype: torch.dtype = F32) -> MoEConfig:
    return MoEConfig(**{**BASE, "dtype": dtype}, router=router, **ROUTER_OPTIONS.get(router, {}))


def cpu_names(registry) -> list[str]:
    return [impl.name for impl in registry if impl.supports(CPU, F32)[0]]


ROUTER_NAMES = cpu_names(ROUTERS)
# the interpreter-run Triton kernels take seconds per call: they join the grid with one router
SLOW_BACKENDS = {"triton_grouped"}
BACKEND_NAMES = cpu_names(EXPERT_BACKENDS)


def dispatchers_for(world_size: int) -> list[str]:
    return [impl.name for impl in DISPATCHERS if impl.fn.supports(world_size, "cpu")[0]]


def combinations(world_size: int) -> list[tuple[str, str, str, bool, int]]:
    """(router, backend, dispatcher, shared_overlap, chunks, own_first): routers x backends x dispatchers
    synchronously, then every overlap with every dispatcher."""
    grid = [
        (r, b, d, *SYNC)
        for r in ROUTER_NAMES
        for b in BACKEND_NAMES
        for d in dispatchers_for(world_size)
        if b not in SLOW_BACKENDS or r == "softmax_topk"
    ]
    overlapped = [("grouped_topk", "grouped_loop", d, *o) for d in dispatchers_for(world_size) for o in OVERLAPS[1:]]
    return grid + overlapped


def rank_slice(rank: int) -> slice:
    return slice(sum(TOKENS[:rank]), sum(TOKENS[: rank + 1]))


def layer_rank(rank: int, world_size: int) -> dict:
    outputs = {}
    for router, backend, dispatcher, shared_overlap, chunks, own_first in combinations(world_size):
        config = config_of(router)
        problem = make_problem(config, sum(TOKENS[:world_size]), seed=SEED)
        layer = MoELayer(
            config,
            backend=backend,
            dispatcher=dispatcher,
            weights=problem.weights,
            max_tokens=32,
            shared_overlap=shared_overlap,
            chunks=chunks,
            own_first=own_first,
        )
        outputs[router, backend, dispatcher, shared_overlap, chunks, own_first] = layer(problem.x[rank_slice(rank)])
    for dispatcher in dispatchers_for(world_size):
        config = config_of(FLOAT64_ROUTER, F64)
        problem = make_problem(config, sum(TOKENS[:world_size]), seed=SEED)
        layer = MoELayer(config, backend="naive", dispatcher=dispatcher, weights=problem.weights, max_tokens=32)
        outputs["float64", dispatcher] = layer(problem.x[rank_slice(rank)])
    indivisible = MoEConfig(**{**BASE, "num_experts": 2 * world_size + 1})
    mistakes = {
        "other chunks": caught(MoELayer, config_of("softmax_topk"), dispatcher="nccl", chunks=1 + rank % 2),
        "indivisible experts": caught(MoELayer, indivisible, dispatcher="symmetric"),
    }
    return {"outputs": outputs, "mistakes": mistakes}


def caught(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except ValueError as error:
        return str(error)
    return "no error"


@functools.cache
def world(world_size: int) -> list[dict]:
    return spawn_ranks(layer_rank, world_size, timeout_s=280)


@functools.cache
def oracle(router: str, world_size: int, dtype: torch.dtype = F32) -> torch.Tensor:
    """Each rank's tokens through the oracle on their own: a rank routes its own batch, which matters for
    the batch-level router (sinkhorn balances over the tokens it is given)."""
    config = config_of(router, dtype)
    problem = make_problem(config, sum(TOKENS[:world_size]), seed=SEED)
    per_rank = [problem.x[rank_slice(q)] for q in range(world_size)]
    return torch.cat([reference_moe(x, problem.weights, config).y for x in per_rank])


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_combination_matches_the_oracle_and_overlap_changes_nothing(world_size):
    results = world(world_size)
    cases = combinations(world_size)
    assert {c[2] for c in cases} >= {"nccl", "padded", "symmetric"} and len({c[1] for c in cases}) >= 5
    for case in cases:
        y = torch.cat([r["outputs"][case] for r in results])
        assert_close_to_reference(y, oracle(case[0], world_size), F32, f"{world_size} ranks {case}")
    for case in cases:
        if case[3:] != SYNC:
            sync = torch.cat([r["outputs"][(*case[:3], *SYNC)] for r in results])
            overlapped = torch.cat([r["outputs"][case] for r in results])
            torch.testing.assert_close(overlapped, sync, rtol=1e-6, atol=1e-6, msg=f"{world_size} ranks {case}")


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_float64_layer_on_every_dispatcher_is_float64_exact(world_size):
    """Router weights travel at float64 beside float64 rows: a float32 hop leaves ~2e-8, far above 1e-12."""
    results = world(world_size)
    for dispatcher in dispatchers_for(world_size):
        y = torch.cat([r["outputs"]["float64", dispatcher] for r in results])
        assert y.dtype == F64
        expected = oracle(FLOAT64_ROUTER, world_size, F64)
        assert_close_to_reference(y, expected, F64, f"float64 layer, {world_size} ranks, {dispatcher}")


def test_ranks_built_with_other_settings_or_indivisible_experts_raise_on_every_rank():
    for q, result in enumerate(world(2)):
        message = result["mistakes"]["other chunks"]
        assert "ranks [1] were built with other settings" in message and "chunks" in message, f"rank {q}: {message}"
        message = result["mistakes"]["indivisible experts"]
        assert "num_experts (5) must be divisible by the world size (2)" in message, f"rank {q}: {message}"
