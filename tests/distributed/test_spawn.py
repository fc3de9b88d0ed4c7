"""The rank launchers themselves (spawn_ranks, RankPool): results come back by rank, errors surface, a hung
rank times out, and a pool's ranks keep their state and process group between calls."""

import time

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from moekit.testing.spawn import RankPool, spawn_ranks


def all_reduce_rank(rank, world_size):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return rank, t


def large_result(rank, world_size):
    return torch.full((512, 1024), float(rank))  # 2 MiB, far more than a pipe holds


def fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")


def hang_on_rank_one(rank, world_size):
    if rank == 1:
        time.sleep(600)


_KEPT: dict = {}


def keep_a_tensor(rank, world_size, value):
    _KEPT["t"] = torch.tensor([value * (rank + 1)])
    return rank


def sum_the_kept_tensors(rank, world_size):
    t = _KEPT["t"].clone()
    dist.all_reduce(t)
    return float(t)


def test_results_come_back_by_rank():
    results = spawn_ranks(all_reduce_rank, 3)
    assert [r for r, _ in results] == [0, 1, 2]
    assert all(float(t) == 6.0 for _, t in results)


def test_large_results_come_back():
    results = spawn_ranks(large_result, 2, timeout_s=60)
    assert [float(r.mean()) for r in results] == [0.0, 1.0]


def test_an_error_on_a_rank_is_raised_here():
    with pytest.raises(ProcessRaisedException, match="boom on rank 1"):
        spawn_ranks(fail_on_rank_one, 2)


def test_a_hung_rank_fails_instead_of_hanging():
    begin = time.monotonic()
    with pytest.raises(TimeoutError, match="still running after 5 s"):
        spawn_ranks(hang_on_rank_one, 2, timeout_s=5)
    assert time.monotonic() - begin < 60


def test_a_pool_runs_many_calls_on_the_same_ranks_and_keeps_their_state():
    with RankPool(3, timeout_s=60) as ranks:
        assert ranks.run(keep_a_tensor, 2.0) == [0, 1, 2]
        assert ranks.run(sum_the_kept_tensors) == [12.0] * 3  # 2 + 4 + 6, kept from the first call
        assert ranks.run(keep_a_tensor, 1.0) == [0, 1, 2]
        assert ranks.run(sum_the_kept_tensors) == [6.0] * 3
        assert [float(r.mean()) for r in ranks.run(large_result)] == [0.0, 1.0, 2.0]


def test_a_pool_raises_a_rank_error_and_times_out_a_hung_call():
    ranks = RankPool(2, timeout_s=60)
    with pytest.raises(RuntimeError, match="rank 1 raised in fail_on_rank_one:(.|\\n)*boom on rank 1"):
        ranks.run(fail_on_rank_one)
    with pytest.raises(RuntimeError, match="closed"):
        ranks.run(all_reduce_rank)
    begin = time.monotonic()
    with RankPool(2, timeout_s=5) as hung, pytest.raises(TimeoutError, match="hang_on_rank_one still running"):
        hung.run(hang_on_rank_one)
    assert time.monotonic() - begin < 60
