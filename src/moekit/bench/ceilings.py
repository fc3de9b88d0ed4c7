"""The two ceilings a kernel is judged against, measured on the machine in the same run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.bench.timing import measure


@dataclass(frozen=True)
class Ceilings:
    """matmul_tflops: dense matmul rate (bf16 on GPU, float32 on CPU); copy_gbps: bytes read + written;
    fp8_matmul_tflops: dense e4m3 torch._scaled_mm with rowwise scales (measured when asked, on GPU)."""

    matmul_tflops: float
    copy_gbps: float
    fp8_matmul_tflops: float | None = None


def fp8_matmul_tflops(device: torch.device, n: int = 8192) -> float | None:
    """Dense n^3 e4m3 torch._scaled_mm, rowwise float32 scales, bf16 out; None where it cannot run."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return None
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as the op wants
    scale_a, scale_b = torch.rand(n, 1, device=device), torch.rand(1, n, device=device)
    run = measure(lambda: torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16), device, runs=20)
    return 2 * n**3 / run.median_ms / 1e9


def measure_ceilings(device: torch.device, *, fp8: bool = False) -> Ceilings:
    """Dense n^3 matmul (n = 8192 on GPU, 1024 on CPU) and a large copy, median of several runs; with fp8 the
    e4m3 matmul rate too."""
    gpu = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = measure(lambda: a @ b, device, runs=20 if gpu else 5)
    elements = (1 << 30) // 4 if gpu else (1 << 26) // 4  # 1 GiB on GPU, 64 MiB on CPU, float32
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, runs=20 if gpu else 5)
    fp8_rate = fp8_matmul_tflops(device) if fp8 else None
    return Ceilings(2 * n**3 / matmul.median_ms / 1e9, 2 * src.nbytes / copy.median_ms / 1e6, fp8_rate)
