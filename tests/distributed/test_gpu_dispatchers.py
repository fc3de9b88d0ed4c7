"""Every dispatcher that runs on CUDA, on real ranks (spawned, NCCL, one GPU each), on every world size
the machine has GPUs for: ep_forward with real experts (fp32, a shared expert, uneven token counts, a
rank without tokens) equals the float64 oracle over several calls (buffer rings turned, chunked
pipelining), and combine(dispatch(x)) with identity experts in bf16 is sum_k w_k x + shared_out.
The same check runs with 2 and 3 ranks sharing one GPU over gloo (NCCL refuses that): separate processes
storing into each other's buffers and waiting on each other's flags, which one GPU can test."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, make_problem, reference_moe, route
from moekit.ep import DISPATCHERS, ep_forward
from moekit.testing.numerics import assert_close_to_reference
from moekit.testing.spawn import spawn_ranks

TOKENS = [37, 0, 64, 5, 12, 80, 1, 33]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
CASES = [
    (ws, impl.name)
    for ws in (1, 2, 4, 8)
    for impl in DISPATCHERS
    if ws <= max(GPUS, 1) and impl.fn.supports(ws, "cuda")[0]
]


SHARED_GPU_CASES = [
    (ws, impl.name)
    for ws in (2, 3)
    for impl in DISPATCHERS
    if impl.name != "symm_mem" and impl.fn.supports(ws, "cuda")[0]
]


def _on_rank(rank, world_size, path, shared_gpu=False):
    device = torch.device("cuda", 0 if shared_gpu else rank)
    torch.cuda.set_device(device)
    tokens = TOKENS[:world_size]
    start, T = sum(tokens[:rank]), tokens[rank]
    config = MoEConfig(64, 96, 4 * world_size, 3, num_shared_experts=1, dtype=torch.float32)
    problem = make_problem(config, sum(tokens), seed=11, device=device)
    x = problem.x[start : start + T]
    dispatcher = DISPATCHERS.get(path).fn(None, config.num_experts, 64, max(tokens), torch.float32, device)
    backend = "triton_grouped" if dispatcher.fixed_shapes else "grouped_mm"  # padded rows: device offsets
    ref = reference_moe(problem.x, problem.weights, config).y[start : start + T]
    layers = [ep_forward(x, problem.weights, config, dispatcher, backend, chunks=c) for c in (1, 3, 1, 2)]

    bf16 = DISPATCHERS.get(path).fn(None, config.num_experts, 64, max(tokens), torch.bfloat16, device)
    routing = route(problem.router_logits(), config, None)
    ids, w = routing.topk_ids[start : start + T], routing.topk_weights[start : start + T]
    xb, shared = x.to(torch.bfloat16), torch.randn_like(x).to(torch.bfloat16)
    identity = []
    for _ in range(4):
        recv_x, _, handle = bf16.dispatch(xb, ids, w)
        y = bf16.combine(recv_x, handle, shared)
        identity.append((y.cpu(), (w.sum(1, dtype=torch.float64)[:, None] * xb.double() + shared.double()).cpu()))
    return [(y.cpu(), ref.cpu()) for y in layers], identity


@pytest.mark.gpu
@pytest.mark.parametrize(("world_size", "path"), CASES, ids=[f"{ws}-gpus-{p}" for ws, p in CASES])
def test_dispatcher_on_gpus_matches_oracle(world_size, path):
    if GPUS < world_size:
        pytest.skip(f"needs {world_size} CUDA devices; {GPUS} here")
    _assert_ranks_match(spawn_ranks(_on_rank, world_size, path, backend="nccl", timeout_s=300), path)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("world_size", "path"), SHARED_GPU_CASES, ids=[f"{ws}-ranks-one-gpu-{p}" for ws, p in SHARED_GPU_CASES]
)
def test_dispatcher_with_ranks_sharing_a_gpu_matches_oracle(world_size, path):
    if GPUS < 1:
        pytest.skip("needs a CUDA device")
    _assert_ranks_match(spawn_ranks(_on_rank, world_size, path, True, backend="gloo", timeout_s=300), path)


def _assert_ranks_match(results, path):
    for layers, identity in results:
        for y, ref in layers:
            assert_close_to_reference(y, ref, torch.float32, f"{path} ep_forward")
        for y, ref in identity:
            assert_close_to_reference(y, ref, torch.bfloat16, f"{path} combine(dispatch(x))")


def _symm_mem_on_shared_gpu(rank, world_size):
    torch.cuda.set_device(0)
    try:
        DISPATCHERS.get("symm_mem").fn(None, 4 * world_size, 64, 8, torch.bfloat16, torch.device("cuda", 0))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.gpu
def test_symm_mem_refuses_ranks_sharing_a_gpu():
    """NVSHMEM's teams abort the process when ranks share a GPU: symm_mem says so first, on every rank."""
    if GPUS < 1:
        pytest.skip("needs a CUDA device")
    for message in spawn_ranks(_symm_mem_on_shared_gpu, 2, backend="gloo", timeout_s=120):
        assert message is not None and "share a GPU" in message


def test_two_gpu_paths_are_listed():
    """symm_mem needs 2 ranks; nvshmem_triton runs on any count of GPUs."""
    two = [impl.name for impl in DISPATCHERS if impl.fn.supports(2, "cuda")[0] or impl.name == "symm_mem"]
    paths = {"nccl", "padded", "padded_triton", "symmetric", "symmetric_triton", "nvshmem_triton"}
    paths |= {"nvshmem_triton_graph", "symmetric_triton_graph", "symm_mem"}
    assert paths <= set(two)
    assert not DISPATCHERS.get("symm_mem").fn.supports(1, "cuda")[0]
