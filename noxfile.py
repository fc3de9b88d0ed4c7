"""nox sessions: `cpu` (unit + distributed), `perf` (the CPU perf gate), `gpu` (on the GPU machine), `lint`.

Pytest arguments go after `--`, e.g. `nox -s cpu -- -k routers -x`.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "cpu", "perf"]
nox.options.error_on_missing_interpreters = True

CPU_INSTALL = ["-c", "constraints/cpu.txt", "-e", ".[test,triton,plot,export,hf]"]
PYTEST = ["python", "-m", "pytest"]
GATE = ["python", "-m", "moekit", "gate"]
# Never let NVLink multicast run on the shared GPU machines; set in every process we start there.
SAFE_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GPU_ENV = {**SAFE_GPU_ENV, "HYPOTHESIS_PROFILE": "gpu", "PYTHONPATH": "src"}


@nox.session
def cpu(session: nox.Session) -> None:
    """Unit and distributed tests on the CPU: Triton kernels under the interpreter, gloo for ranks."""
    session.install(*CPU_INSTALL)
    env = {"TRITON_INTERPRET": "1", "HYPOTHESIS_PROFILE": "ci"}
    session.run(*PYTEST, "tests/unit", "tests/distributed", "-n", "2", *session.posargs, env=env)


@nox.session
def perf(session: nox.Session) -> None:
    """CPU perf cases against baselines/cpu.json, gated on speedup ratios only (absolute CPU times vary
    too much between machines); the gate's own end-to-end test runs here too. Plot: .perf/cpu.png."""
    session.install(*CPU_INSTALL)
    Path(".perf").mkdir(exist_ok=True)
    current = ".perf/cpu.json"
    session.run(*PYTEST, "tests/perf", "-p", "no:xdist", f"--benchmark-json={current}", *session.posargs)
    session.run(*GATE, current, "--baseline", "baselines/cpu.json", "--ratios-only", "--plot", ".perf/cpu.png")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """Everything on the GPU machine, in the interpreter nox was started from (its torch is the CUDA
    build and nothing can be installed there): see ../shared/device/README.md. The perf cases are
    gated against baselines/<machine kind>.json on speedup ratios and absolute medians."""
    # one grouped-GEMM config for the correctness tests; the perf cases autotune (kernels/grouped_gemm.py).
    # Four workers share the GPU: the suite is hundreds of small cases, and one worker leaves it mostly idle
    env = {**GPU_ENV, "MOEKIT_GROUPED_GEMM_TUNE": "0"}
    session.run(*PYTEST, "tests/unit", "tests/distributed", "-n", "4", *session.posargs, env=env)
    run_gpu_perf_gate(session)


@nox.session(venv_backend="none", name="gpu-perf")
def gpu_perf(session: nox.Session) -> None:
    """Only the GPU perf cases and their gate (a minute): check a baseline, or a kernel change, quickly."""
    run_gpu_perf_gate(session)


def run_gpu_perf_gate(session: nox.Session) -> None:
    Path(".perf").mkdir(exist_ok=True)
    current = ".perf/gpu.json"
    session.run(*PYTEST, "tests/perf", "-m", "perf", f"--benchmark-json={current}", env=GPU_ENV)
    session.run(*GATE, current, "--plot", ".perf/gpu.png", env=GPU_ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, the tests and this file."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "conftest.py", "noxfile.py", *session.posargs)
