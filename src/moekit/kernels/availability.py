"""Where the Triton kernels can run: on CUDA, or on the CPU under the Triton interpreter."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

INTERPRETER_DTYPES = (torch.float32, torch.float16)  # the interpreter computes bf16 wrongly (DESIGN.md)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, reason) for running a moekit Triton kernel on device with dtype."""
    if not _triton_installed():
        return False, "triton is not installed (pip install moekit[triton])"
    if dtype not in KERNEL_DTYPES:
        return False, f"the Triton kernels take {[str(d) for d in KERNEL_DTYPES]}, not {dtype}"
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False, "a Triton kernel needs CUDA, or TRITON_INTERPRET=1 on the CPU"
    if dtype not in INTERPRETER_DTYPES:
        return False, f"the Triton interpreter computes {dtype} wrongly; checked on GPU"
    return True, ""


def triton_on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a path with a torch-ops twin takes its Triton kernel: on CUDA only (on the CPU the torch ops
    run, and define the result)."""
    return device.type == "cuda" and triton_support(device, dtype)[0]


def fp8_triton_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, reason) for a moekit FP8 Triton kernel with activations of dtype: triton_support, and on CUDA FP8
    tensor cores (compute capability 8.9 or newer)."""
    ok, reason = triton_support(device, dtype)
    if ok and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False, f"FP8 tensor cores need compute capability 8.9 or newer, {device} has " + ".".join(
            map(str, torch.cuda.get_device_capability(device))
        )
    return ok, reason
