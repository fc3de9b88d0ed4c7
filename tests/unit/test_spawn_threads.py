"""share_cpu_threads: each of N busy processes (times the xdist workers) gets its share of the cores."""

import os

import torch

from moekit.testing.spawn import share_cpu_threads


def test_threads_are_shared_among_processes_and_workers(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    try:
        assert share_cpu_threads(4) == 2 and torch.get_num_threads() == 2
        assert share_cpu_threads(32) == 1  # never below one
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
        assert share_cpu_threads(1) == 16
    finally:
        torch.set_num_threads(before)
