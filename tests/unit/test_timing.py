"""moekit.bench.timing: interleaved timing, and CUDA-graph replays that keep what the graph reads alive."""

import gc

import pytest
import torch

from moekit.bench.timing import as_cuda_graph, measure_interleaved, measure_queued


def test_measure_interleaved_times_each_callable_and_refuses_no_runs():
    calls = []
    timings = measure_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], torch.device("cpu"), runs=4)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a", "b"] * 4  # three warm-up calls each, then four in turn
    assert all(t.runs == 4 and 0 <= t.min_ms <= t.median_ms for t in timings)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        measure_interleaved([lambda: None], torch.device("cpu"), runs=0)


def test_measure_queued_times_batches_of_calls_and_refuses_no_calls():
    calls = []
    timing = measure_queued(lambda: calls.append(1), torch.device("cpu"), calls=3, warmup=6, runs=4)
    assert len(calls) == 3 * (2 + 4)  # two warm-up batches, then four timed batches of three calls
    assert timing.runs == 4 and 0 <= timing.min_ms <= timing.median_ms
    with pytest.raises(ValueError, match="calls must be >= 1"):
        measure_queued(lambda: None, torch.device("cpu"), calls=0)


def _graph_of_a_local_input(out: torch.Tensor):
    """A replay whose input exists only in this frame (and in the closure the graph was captured from)."""
    x = torch.arange(out.numel(), dtype=torch.float32, device=out.device)
    return as_cuda_graph(lambda: torch.mul(x, 2.0, out=out))


@pytest.mark.gpu
def test_a_replay_keeps_the_tensors_its_graph_reads_alive():
    out = torch.full((1 << 20,), float("nan"), device="cuda")
    replay = _graph_of_a_local_input(out)
    gc.collect()
    overwrite = [torch.full((1 << 20,), -7.0, device="cuda") for _ in range(4)]  # reuses freed blocks, if any
    replay()
    torch.cuda.synchronize()
    expected = 2.0 * torch.arange(out.numel(), dtype=torch.float32, device="cuda")
    assert torch.equal(out, expected), "the graph read memory freed after capture"
    del overwrite
