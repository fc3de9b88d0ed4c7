"""Every expert backend against a reference on the same routed tokens: the naive per-expert loop on the CPU;
on GPU grouped_mm, which never waits on the host, so the ratio follows the GPU and not the lease's host CPU."""

import pytest

from moekit import EXPERT_BACKENDS, MoEConfig, make_problem, quantize_weights, route
from moekit.bench.flops import routed_expert_flops
from moekit.bench.forward import batched_bytes, free_memory
from moekit.experts import FP8_EXPERT_BACKENDS
from moekit.quantize import SCHEMES
from moekit.validation import trusted_values

from sizes import DTYPE, EXPERT_SHAPE, EXPERT_TOKENS, GPU

pytestmark = pytest.mark.perf

CONFIG = MoEConfig(**EXPERT_SHAPE, router="topk_softmax", dtype=DTYPE)
REFERENCE = "grouped_mm" if GPU else "naive"
# these wait on the host between routing and output (boolean masks, .tolist() of the expert counts)
HOST_WAITING_BACKENDS = {"naive", "fused_act", "memeff", "grouped_loop"}


@pytest.fixture(scope="module")
def routed_problem(perf_device):
    problem = make_problem(CONFIG, EXPERT_TOKENS, seed=0, device=perf_device)
    return problem, route(problem.router_logits(), CONFIG)


def hot_path(fn, args):
    """fn(*args) as a layer runs it: the router's ids are trusted, so no range check waits for the device."""

    def run():
        with trusted_values():
            return fn(*args)

    return run


@pytest.mark.benchmark(group="experts")
@pytest.mark.parametrize("backend", [n for n in EXPERT_BACKENDS.names() if n != REFERENCE])
def test_expert_backend(backend, perf, routed_problem, perf_device):
    ok, reason = EXPERT_BACKENDS.get(backend).supports(perf_device, DTYPE)
    if not ok:
        pytest.skip(reason)
    problem, routing = routed_problem
    if backend == "batched" and batched_bytes(problem) > 0.8 * free_memory(perf_device):
        pytest.skip(f"batched needs {batched_bytes(problem) / 2**30:.0f} GiB of weight copies at this size")
    args = (problem.x, routing.topk_ids, routing.topk_weights, problem.weights)
    fast, reference = EXPERT_BACKENDS.get(backend).fn, EXPERT_BACKENDS.get(REFERENCE).fn
    perf(
        hot_path(fast, args),
        hot_path(reference, args),
        reference_name=REFERENCE,
        host_bound=backend in HOST_WAITING_BACKENDS or REFERENCE in HOST_WAITING_BACKENDS,
        flops=routed_expert_flops(EXPERT_TOKENS, CONFIG),
    )


@pytest.mark.benchmark(group="experts")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("backend", FP8_EXPERT_BACKENDS.names())
def test_fp8_expert_backend(backend, scheme, perf, routed_problem, perf_device):
    """An FP8 backend on e4m3 weights against the bf16 reference on the original ones, same tokens."""
    ok, reason = FP8_EXPERT_BACKENDS.get(backend).supports(perf_device, DTYPE, scheme)
    if not ok:
        pytest.skip(reason)
    problem, routing = routed_problem
    routed = (problem.x, routing.topk_ids, routing.topk_weights)
    perf(
        hot_path(FP8_EXPERT_BACKENDS.get(backend).fn, (*routed, quantize_weights(problem.weights, scheme))),
        hot_path(EXPERT_BACKENDS.get(REFERENCE).fn, (*routed, problem.weights)),
        reference_name=REFERENCE,
        host_bound=REFERENCE in HOST_WAITING_BACKENDS,
        flops=routed_expert_flops(EXPERT_TOKENS, CONFIG),
    )
