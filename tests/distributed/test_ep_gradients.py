"""The expert-parallel layer trains: on 2-4 gloo ranks, every dispatcher that trains on the CPU gives the float64
oracle's gradients (dx on every rank; d router weight, d expert weights and d shared experts summed over the
ranks, each rank holding its own tokens' share and its own experts' rows) through dispatch's backward (a combine)
and combine's (a dispatch). Cases: a rank with no tokens, every token on one rank's experts (the others receive
nothing), K = E, more experts than hidden units; float64 end to end (exact to 1e-12) and float32 (the gradient
tolerance)."""

import functools
from dataclasses import replace

import pytest
import torch

from moekit import MoEConfig, MoELayer, make_problem
from moekit.ep import DISPATCHERS
from moekit.reference import reference_moe
from moekit.testing import assert_close_to_reference
from moekit.testing.numerics import gradient_tolerance
from moekit.testing.spawn import spawn_ranks

F32, F64 = torch.float32, torch.float64
TOKENS = [7, 0, 13, 5]
LEAVES = ("router_weight", "w_gate_up", "w_down", "shared_gate_up", "shared_down")


def cases(world_size: int) -> dict[str, tuple[MoEConfig, dict]]:
    """name -> (config, what to change in the drawn weights)."""
    base = dict(hidden_size=24, ffn_size=16, num_shared_experts=1)
    E = 3 * world_size
    return {
        "softmax_topk": (MoEConfig(**base, num_experts=E, top_k=3, router="softmax_topk"), {}),
        # the correction bias picks experts 0..2 (rank 0's) for every token: the other ranks receive no rows
        "one rank's experts": (
            MoEConfig(
                **base,
                num_experts=E,
                top_k=3,
                router="grouped_topk",
                n_group=1,
                topk_group=1,
                routed_scaling_factor=2.5,
            ),
            {"bias_on": [0, 1, 2]},
        ),  # fmt: skip
        "K = E": (MoEConfig(**base, num_experts=2 * world_size, top_k=2 * world_size, router="softmax_topk"), {}),
        # the router weights' gradients go home in columns of H, one combine per H experts: here two or more
        "E > H": (MoEConfig(hidden_size=8, ffn_size=16, num_experts=5 * world_size, top_k=4, num_shared_experts=1), {}),
    }


def problem_of(config: MoEConfig, change: dict, world_size: int, dtype: torch.dtype):
    problem = make_problem(replace(config, dtype=dtype), sum(TOKENS[:world_size]), seed=11)
    if "bias_on" in change:
        bias = torch.zeros(config.num_experts)
        bias[change["bias_on"]] = 100.0
        problem = replace(problem, weights=replace(problem.weights, score_correction_bias=bias))
    return problem


def rank_slice(rank: int) -> slice:
    return slice(sum(TOKENS[:rank]), sum(TOKENS[: rank + 1]))


def upstream(problem) -> torch.Tensor:
    """dy [T, H] for all ranks' tokens, random."""
    return torch.randn(problem.x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)


def trained_dispatchers(world_size: int) -> list[str]:
    names = DISPATCHERS.training_names()
    return [name for name in names if DISPATCHERS.get(name).fn.supports(world_size, "cpu")[0]]


def step(problem, dispatcher: str | None, backend: str, rank: int) -> dict[str, torch.Tensor]:
    """Gradients of <layer(x of this rank), dy of this rank>: dx and every parameter's, on the CPU. Each .grad
    starts poisoned (random values backward must add to, taken off again); two more backward passes on the
    retained graph must give equal gradients ("repeatable": no state left in the exchanges)."""
    device = problem.x.device
    layer = MoELayer(problem.config, backend=backend, dispatcher=dispatcher, weights=problem.weights, max_tokens=16,
                     device=device)  # fmt: skip
    layer.requires_grad_(True)
    x = problem.x[rank_slice(rank)].clone().requires_grad_()
    leaves = {"x": x, **{name: p for name, p in layer.named_parameters() if name in LEAVES}}
    g = torch.Generator().manual_seed(rank)
    poisons = {name: torch.randn(t.shape, generator=g, dtype=t.dtype).to(device) for name, t in leaves.items()}
    for name, t in leaves.items():
        t.grad = poisons[name].clone()
    y = layer(x)
    dy = upstream(problem)[rank_slice(rank)].to(device, y.dtype)
    y.backward(dy, retain_graph=True)
    grads = {name: (t.grad - poisons[name]).cpu() for name, t in leaves.items()}
    once, twice = (
        torch.autograd.grad(y, list(leaves.values()), dy, retain_graph=True, allow_unused=True, materialize_grads=True)
        for _ in range(2)
    )
    return {**grads, "repeatable": all(torch.equal(a, b) for a, b in zip(once, twice))}


def gradients_rank(rank: int, world_size: int) -> dict:
    out = {}
    for name, (config, change) in cases(world_size).items():
        for dispatcher in trained_dispatchers(world_size):
            for dtype, backend in ((F64, "naive"), (F32, "grouped_mm")):
                out[name, dispatcher, dtype] = step(problem_of(config, change, world_size, dtype), dispatcher, backend,
                                                    rank)  # fmt: skip
    return out


@functools.cache
def world(world_size: int) -> list[dict]:
    return spawn_ranks(gradients_rank, world_size, timeout_s=240)


@functools.cache
def oracle(name: str, world_size: int) -> dict[str, torch.Tensor]:
    """The float64 oracle's gradients, each rank's tokens routed as its own batch (as its layer routes them)."""
    config, change = cases(world_size)[name]
    problem = problem_of(config, change, world_size, F64)
    weights = problem.weights
    leaves = {name: getattr(weights, name).detach().double().clone().requires_grad_() for name in LEAVES}
    weights = replace(weights, **leaves)
    x = problem.x.double().clone().requires_grad_()
    y = torch.cat([reference_moe(x[rank_slice(q)], weights, problem.config).y for q in range(world_size)])
    y.backward(upstream(problem))
    return {"x": x.grad, **{name: t.grad for name, t in leaves.items()}}


def assert_ranks_match_the_oracle(results: list[dict], world_size: int, dispatchers: list[str], dtypes):
    for name in cases(world_size):
        expected = oracle(name, world_size)
        for dispatcher in dispatchers:
            for dtype in dtypes:
                assert all(r[name, dispatcher, dtype]["repeatable"] for r in results), (name, dispatcher, dtype)
                got = {"x": torch.cat([r[name, dispatcher, dtype]["x"] for r in results])}
                got |= {leaf: sum(r[name, dispatcher, dtype][leaf] for r in results) for leaf in LEAVES}
                for leaf, value in got.items():
                    what = f"{world_size} ranks, {name}, {dispatcher}, {dtype}: d{leaf}"
                    # the router weight is a float32 parameter in every layer: its gradient is rounded to it
                    tolerance = None if value.dtype == F64 else gradient_tolerance(value.dtype)
                    assert_close_to_reference(value, expected[leaf], value.dtype, what, tolerance)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_expert_parallel_gradients_match_the_oracle(world_size):
    assert {"nccl", "padded", "symmetric"} <= set(trained_dispatchers(world_size))
    assert_ranks_match_the_oracle(world(world_size), world_size, trained_dispatchers(world_size), (F64, F32))


# the Triton dispatchers store into each other's buffers and wait on flags: separate processes on one GPU (gloo
# carries the setup), which the CPU's simulated group, all ranks in one process in lockstep, cannot run backward on
SHARED_GPU_DISPATCHERS = ["padded_triton", "symmetric_triton"]


def on_cuda(problem):
    return replace(problem, x=problem.x.cuda(), weights=problem.weights.to("cuda"))


def shared_gpu_gradients_rank(rank: int, world_size: int) -> dict:
    torch.cuda.set_device(0)
    out = {}
    for name, (config, change) in cases(world_size).items():
        problem = on_cuda(problem_of(config, change, world_size, F32))
        for dispatcher in SHARED_GPU_DISPATCHERS:  # triton_grouped: the padded rows' device offsets
            out[name, dispatcher, F32] = step(problem, dispatcher, "triton_grouped", rank)
    return out


@pytest.mark.gpu
def test_triton_dispatchers_train_on_ranks_sharing_a_gpu():
    assert set(SHARED_GPU_DISPATCHERS) <= set(DISPATCHERS.training_names())
    results = spawn_ranks(shared_gpu_gradients_rank, 2, backend="gloo", timeout_s=300)
    assert_ranks_match_the_oracle(results, 2, SHARED_GPU_DISPATCHERS, (F32,))
