"""Expert parallelism on the machine's GPUs (2 or more, one rank each, NCCL), on the ranks of one RankPool:
dispatch + combine of every path against nccl at issue #8's two sizes (low-latency: 128 tokens per rank,
normal: 4096; H = 7168, K = 8, E = 256, bf16), and the DeepSeek-V3 layer (4096 tokens per rank) overlapped
against synchronous with nccl and nvshmem_triton, issue #10's pair. Each pair is timed on the ranks in the
same run (moekit.bench.pool_cases); pytest-benchmark's rounds are pool calls of CALLS round trips or layers
on every rank, and extra_info holds the per-call figures: speedup, off-rank GB/s, eta_overlap, % of the dense
matmul rate measured here."""

import pytest
import torch

from moekit import MoEConfig
from moekit.bench.a2a import CONFIGS
from moekit.bench.ep import EPCase, eta_overlap
from moekit.bench.flops import layer_flops
from moekit.bench.pool_cases import (
    prepare_layer,
    prepare_round_trips,
    release,
    run_layers,
    run_round_trips,
    time_layer_phases,
    time_round_trips,
)
from moekit.ep import DISPATCHERS
from moekit.testing.spawn import RankPool

pytestmark = [pytest.mark.perf, pytest.mark.multigpu]

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLD = max(GPUS, 2)
A2A_PATHS = [n for n in DISPATCHERS.names() if n != "nccl" and DISPATCHERS.get(n).fn.supports(WORLD, "cuda")[0]]
CALLS = {"low-latency": 100, "normal": 10}  # round trips per benchmark round: a round of 5 ms and more
DEEPSEEK_V3 = MoEConfig(
    hidden_size=7168, ffn_size=2048, num_experts=256, top_k=8, num_shared_experts=1, router="grouped_topk",
    n_group=8, topk_group=4, routed_scaling_factor=2.5, dtype=torch.bfloat16,
)  # fmt: skip
LAYER_TOKENS = 4096
LAYER_CASES = [("nccl", "grouped_mm_fused"), ("nvshmem_triton", "grouped_mm_fused")]


@pytest.fixture(scope="module")
def ranks():
    with RankPool(GPUS, backend="nccl", timeout_s=900) as pool:
        yield pool


@pytest.fixture(scope="module", params=["low-latency", "normal"])
def a2a_config(request, ranks):
    """Every path's dispatcher for one config, prepared on the ranks (and released after its cases)."""
    config = CONFIGS[request.param]
    ranks.run(prepare_round_trips, config, ["nccl", *A2A_PATHS])
    yield config.name
    ranks.run(release, f"{config.name}/")


@pytest.mark.benchmark(group="a2a_gpus")
@pytest.mark.parametrize("path", A2A_PATHS)
def test_dispatch_combine_on_gpus(path, a2a_config, ranks, perf):
    name = f"{a2a_config}/{path}"
    fast_us, nccl_us, gbps = ranks.run(time_round_trips, name, f"{a2a_config}/nccl", 30)[0]
    calls = CALLS[a2a_config]
    info = perf(
        lambda: ranks.run(run_round_trips, name, calls), measured=(fast_us / 1e3, nccl_us / 1e3),
        reference_name="nccl", host_bound=True, runs=20,
    )  # fmt: skip
    info.update(gpus=GPUS, round_trips_per_round=calls, offrank_gbps=gbps)


@pytest.mark.benchmark(group="ep_layer_gpus")
@pytest.mark.parametrize(("path", "backend"), LAYER_CASES, ids=[path for path, _ in LAYER_CASES])
def test_ep_layer_on_gpus(path, backend, ranks, perf):
    name = f"layer/{path}"
    ranks.run(prepare_layer, name, EPCase(DEEPSEEK_V3, LAYER_TOKENS, backend, path, chunks=2))
    try:
        ms = ranks.run(time_layer_phases, name, 10)[0]
        info = perf(
            lambda: ranks.run(run_layers, name, 2), measured=(ms["layer_overlapped"], ms["layer_sync"]),
            reference_name="layer synchronous", flops=layer_flops(LAYER_TOKENS, DEEPSEEK_V3), host_bound=True,
            runs=10,
        )  # fmt: skip
    finally:
        ranks.run(release, name)
    comm_ms, compute_ms = ms["dispatch"] + ms["combine"], ms["route"] + ms["experts"] + ms["shared"]
    info.update(
        gpus=GPUS, layers_per_round=2, t_comm_ms=comm_ms, t_compute_ms=compute_ms,
        eta_overlap=eta_overlap(comm_ms, compute_ms, ms["layer_overlapped"]), phases_ms=ms,
    )  # fmt: skip
