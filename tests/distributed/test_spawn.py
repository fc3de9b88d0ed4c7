"""The rank launcher itself: results come back by rank, errors surface, a hung rank times out."""

import time

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from moekit.testing.spawn import spawn_ranks


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
