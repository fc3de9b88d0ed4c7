"""The multi-GPU perf cases' rank functions (moekit.bench.pool_cases) on 2 gloo ranks of one RankPool:
prepared once, timed, called again and released, with figures that make sense and the layer's output
kept equal to the oracle's across the calls."""

import math

import torch

from moekit import MoEConfig, make_problem, reference_moe
from moekit.bench.a2a import CONFIGS
from moekit.bench.ep import PHASES, EPCase
from moekit.bench.pool_cases import (
    prepare_layer,
    prepare_round_trips,
    release,
    run_layers,
    run_round_trips,
    time_layer_phases,
    time_round_trips,
)
from moekit.testing import assert_close_to_reference
from moekit.testing.spawn import RankPool

SMALL = MoEConfig(hidden_size=32, ffn_size=16, num_experts=8, top_k=2, num_shared_experts=1, dtype=torch.float32)
CASE = EPCase(SMALL, 6, "grouped_mm", "nccl", chunks=2, seed=4)


def _prepared_names(rank, world_size):
    from moekit.bench import pool_cases

    return sorted(pool_cases._PREPARED)


def _layer_output(rank, world_size, name):
    from moekit.bench import pool_cases

    return pool_cases._PREPARED[name].state["y"]


def test_round_trips_and_layers_prepared_once_timed_run_and_released():
    with RankPool(2, timeout_s=120) as ranks:
        ranks.run(prepare_round_trips, CONFIGS["cpu"], ["nccl", "padded"])
        assert ranks.run(_prepared_names) == [["cpu/nccl", "cpu/padded"]] * 2
        timings = ranks.run(time_round_trips, "cpu/padded", "cpu/nccl", 3)
        assert timings[0] == timings[1]  # every rank reports the slowest rank's figures
        assert all(value > 0 and math.isfinite(value) for value in timings[0])
        ranks.run(run_round_trips, "cpu/padded", 2)

        ranks.run(prepare_layer, "layer/nccl", CASE)
        phases = ranks.run(time_layer_phases, "layer/nccl", 2)
        assert phases[0] == phases[1] and set(phases[0]) == set(PHASES)
        assert all(ms > 0 for ms in phases[0].values())
        ranks.run(run_layers, "layer/nccl", 2)
        y = torch.cat(ranks.run(_layer_output, "layer/nccl"))

        ranks.run(release, "cpu/")
        assert ranks.run(_prepared_names) == [["layer/nccl"]] * 2
        ranks.run(release, "layer/")
        assert ranks.run(_prepared_names) == [[]] * 2
    problem = make_problem(SMALL, 12, seed=4)
    ref = torch.cat([reference_moe(problem.x[q * 6 : (q + 1) * 6], problem.weights, SMALL).y for q in range(2)])
    assert_close_to_reference(y, ref, torch.float32, "pool layer, overlapped, after repeated calls")
