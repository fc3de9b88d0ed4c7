"""Root fixtures: devices, the tolerance table, marker skips, Hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

from moekit.testing import TOLERANCE, assert_close_to_reference
from moekit.testing.spawn import share_cpu_threads

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
# gpu: each new shape or top-k compiles a Triton variant (about a second each), so 30 draws per test and no
# shrinking: every shrink step is a new shape, and a failing test spent the whole time limit of a GPU run shrinking
# before it reported anything; the failing draw is printed as drawn
settings.register_profile(
    "gpu",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

share_cpu_threads(1)  # under pytest-xdist, each worker takes its share of the cores

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _skip_reason(marker: str) -> str | None:
    """Why a test with this marker cannot run here, or None when it can."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if marker == "gpu" and gpus == 0:
        return "needs a CUDA device; none here"
    if marker == "multigpu" and gpus < 2:
        return f"needs 2 or more CUDA devices; {gpus} here"
    if marker == "nvshmem":
        if gpus == 0:
            return "needs NVSHMEM, which needs CUDA; no CUDA device here"
        try:
            from torch.distributed._symmetric_memory import is_nvshmem_available
        except ImportError:
            return "this torch has no torch.distributed._symmetric_memory.is_nvshmem_available"
        if not is_nvshmem_available():
            return "NVSHMEM is not available to this torch"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker in ("gpu", "multigpu", "nvshmem"):
            if item.get_closest_marker(marker) and (reason := _skip_reason(marker)):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=DEVICES, scope="session")
def device(request) -> torch.device:
    """Every device here: the CPU always, CUDA when present."""
    return torch.device(request.param)


def _triton_skip_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why moekit's Triton kernels do not run here on `device` in dtype, or None when they do: they cannot
    (triton_support's reason), or it is the CUDA run under TRITON_INTERPRET=1 (the CPU run again, with
    copies; the GPU run compiles)."""
    from moekit.kernels.availability import triton_support

    ok, reason = triton_support(device, dtype)
    if not ok:
        return reason
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return "under TRITON_INTERPRET=1 a CUDA run is the CPU run with copies; the GPU run compiles"
    return None


@pytest.fixture
def dtype() -> torch.dtype:
    """float32, where a test does not parametrize dtype (a parametrization of dtype overrides this)."""
    return torch.float32


@pytest.fixture
def triton_device(device, dtype) -> torch.device:
    """`device`, or a skip saying why moekit's Triton kernels do not run on it in `dtype` (parametrized, or
    float32). A fixture, so the skip comes at setup: before Hypothesis runs an example, whose log would
    otherwise read 'Failing explicit example' above a test that only skipped. The test takes dtype as a
    pytest parameter, not as a drawn value."""
    if reason := _triton_skip_reason(device, dtype):
        pytest.skip(reason)
    return device


@pytest.fixture
def impl(backend, dtype, device):
    """The expert backend of that name, or a skip that says why it cannot run here (decided before Hypothesis
    draws). A test of FP8 backends overrides it with its own (supports takes the scheme too)."""
    from moekit.experts import EXPERT_BACKENDS

    implementation = EXPERT_BACKENDS.get(backend)
    ok, reason = implementation.supports(device, dtype)
    if not ok:
        pytest.skip(reason)
    return implementation


@pytest.fixture
def skip_unless_triton_runs(device):
    """skip_unless_triton_runs(dtype): skips the test where moekit's Triton kernels do not run on `device`
    in dtype (_triton_skip_reason). Called in a test body it skips inside Hypothesis: a @given test takes
    triton_device instead."""

    def check(dtype: torch.dtype) -> None:
        if reason := _triton_skip_reason(device, dtype):
            pytest.skip(reason)

    return check


@pytest.fixture
def tolerance():
    """The dtype -> relative-error table (moekit.testing.TOLERANCE)."""
    return TOLERANCE


@pytest.fixture
def assert_close():
    """assert_close(out, ref, dtype, what): ||out - ref|| / ||ref|| within the dtype's tolerance."""
    return assert_close_to_reference
