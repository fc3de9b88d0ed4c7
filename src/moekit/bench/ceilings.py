"""The two ceilings a kernel is judged against, measured on the machine in the same run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.bench.timing import measure


@dataclass(frozen=True)
class Ceilings:
    """matmul_tflops: dense matmul rate (bf16 on GPU, float32 on CPU); copy_gbps: bytes read + written."""

    matmul_tflops: float
    copy_gbps: float


def measure_ceilings(device: torch.device) -> Ceilings:
    """Dense n^3 matmul (n = 8192 on GPU, 1024 on CPU) and a large copy, median of several runs."""
    gpu = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = measure(lambda: a @ b, device, runs=20 if gpu else 5)
    elements = (1 << 30) // 4 if gpu else (1 << 26) // 4  # 1 GiB on GPU, 64 MiB on CPU, float32
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, runs=20 if gpu else 5)
    return Ceilings(2 * n**3 / matmul.median_ms / 1e9, 2 * src.nbytes / copy.median_ms / 1e6)
