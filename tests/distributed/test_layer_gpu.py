"""MoELayer on GPU ranks: every CUDA dispatcher, synchronous and with each overlap, equals the float64 oracle
on every rank's tokens over calls of changing size. Runs with 2 ranks sharing one GPU (gloo: separate
processes, so the symmetric-buffer paths' stores, flags and rings cross processes on any GPU machine) and
with 2 ranks on GPUs of their own (NCCL) where the machine has two."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, make_problem, reference_moe
from moekit.ep import DISPATCHERS
from moekit.ep.local_experts import FIXED_SHAPE_BACKEND
from moekit.layer import MoELayer
from moekit.testing.numerics import assert_close_to_reference
from moekit.testing.spawn import spawn_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TOKENS = [37, 5]  # per rank; each call takes the first `fraction` of them
FRACTIONS = (1.0, 0.5, 1.0)
# (shared_overlap, chunks, own_first, fused_combine); own_first needs host-side counts (not the fixed-shape
# dispatchers); fused_combine a dispatcher that fuses the down projection (symmetric_triton)
OVERLAPS = [(False, 1, False, False), (True, 1, False, False), (False, 3, False, False), (True, 3, True, False)]
OVERLAPS += [(False, 1, False, True), (True, 3, False, True)]


def config_of(world_size: int) -> MoEConfig:
    return MoEConfig(64, 96, 4 * world_size, 3, num_shared_experts=1, router="topk_softmax", dtype=torch.float32)


def cases(world_size: int, shared_gpu: bool) -> list[tuple[str, tuple]]:
    """(dispatcher, overlap) for the CUDA dispatchers; NVSHMEM's symm_mem refuses ranks sharing a GPU."""
    return [
        (impl.name, overlap)
        for impl in DISPATCHERS
        if impl.fn.supports(world_size, "cuda")[0] and not (shared_gpu and impl.name == "symm_mem")
        for overlap in OVERLAPS
        if not (overlap[2] and impl.fn.fixed_shapes) and not (overlap[3] and not impl.fn.fuses_down_projection)
    ]


def rank_tokens(problem_x: torch.Tensor, rank: int, fraction: float) -> torch.Tensor:
    start = sum(TOKENS[:rank])
    return problem_x[start : start + int(TOKENS[rank] * fraction)]


def layer_rank(rank: int, world_size: int, shared_gpu: bool) -> dict:
    device = torch.device("cuda", 0 if shared_gpu else rank)
    torch.cuda.set_device(device)
    config = config_of(world_size)
    problem = make_problem(config, sum(TOKENS), seed=3, device=device)
    inputs = [rank_tokens(problem.x, rank, f) for f in FRACTIONS]
    outputs = {"oracle": [reference_moe(x, problem.weights, config).y.cpu() for x in inputs]}
    for dispatcher, (shared_overlap, chunks, own_first, fused_combine) in cases(world_size, shared_gpu):
        grouped_gemm = DISPATCHERS.get(dispatcher).fn.fixed_shapes or fused_combine
        layer = MoELayer(
            config,
            backend=FIXED_SHAPE_BACKEND if grouped_gemm else "grouped_mm",
            dispatcher=dispatcher,
            weights=problem.weights,
            max_tokens=max(TOKENS),
            device=device,
            shared_overlap=shared_overlap,
            chunks=chunks,
            own_first=own_first,
            fused_combine=fused_combine,
        )
        key = (dispatcher, (shared_overlap, chunks, own_first, fused_combine))
        outputs[key] = [layer(x).cpu() for x in inputs]
    return outputs


def check_against_oracle(results: list[dict], world_size: int, shared_gpu: bool) -> None:
    """Each rank's tokens through the oracle on their own, as the layer routes them."""
    for i in range(len(FRACTIONS)):
        ref = torch.cat([r["oracle"][i] for r in results])
        for case in cases(world_size, shared_gpu):
            y = torch.cat([r[case][i] for r in results])
            assert_close_to_reference(y, ref, torch.float32, f"{world_size} ranks {case} call {i}")


@pytest.mark.gpu
def test_layer_with_two_ranks_sharing_a_gpu_matches_the_oracle():
    if GPUS < 1:
        pytest.skip("needs a CUDA device")
    assert {c[0] for c in cases(2, True)} >= {"nccl", "padded_triton", "nvshmem_triton", "nvshmem_triton_graph"}
    assert ("symmetric_triton", (True, 3, False, True)) in cases(2, True)
    assert ("symmetric_triton_graph", (True, 3, False, True)) in cases(2, True)
    check_against_oracle(spawn_ranks(layer_rank, 2, True, backend="gloo", timeout_s=300), 2, True)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_layer_on_two_gpus_matches_the_oracle():
    if GPUS < 2:
        pytest.skip(f"needs 2 CUDA devices; {GPUS} here")
    check_against_oracle(spawn_ranks(layer_rank, 2, False, backend="nccl", timeout_s=300), 2, False)
