"""nox sessions: `cpu` (the CI suite), `gpu` (on the GPU machine), `perf`, `lint`.

Pytest arguments go after `--`, e.g. `nox -s cpu -- -k routers -x`.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "cpu"]
nox.options.error_on_missing_interpreters = True

CPU_INSTALL = ("-c", "constraints/cpu.txt", "-e", ".[test,triton,plot]")
# Never let NVLink multicast run on the shared GPU machines; set in every process we start there.
SAFE_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@nox.session
def cpu(session: nox.Session) -> None:
    """Unit and distributed tests on the CPU: Triton kernels under the interpreter, gloo for ranks."""
    session.install(*CPU_INSTALL)
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/unit",
        "tests/distributed",
        "-n",
        "2",
        *session.posargs,
        env={"TRITON_INTERPRET": "1", "HYPOTHESIS_PROFILE": "ci"},
    )


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """Everything on the GPU machine, in the interpreter nox was started from (its torch is the CUDA
    build and nothing can be installed there): see ../shared/device/README.md."""
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/unit",
        "tests/distributed",
        *session.posargs,
        env={**SAFE_GPU_ENV, "HYPOTHESIS_PROFILE": "gpu", "PYTHONPATH": "src"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, the tests and this file."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "conftest.py", "noxfile.py", *session.posargs)
