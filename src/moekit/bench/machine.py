"""What a result was measured on: device name, machine kind, library versions."""

from __future__ import annotations

import os
import platform

import torch


def machine_kind(device: torch.device) -> str:
    """'cpu', or the GPU family and count as baselines are named: 'h100', 'h200', 'h200-x2', ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    family = next((f for f in ("h200", "h100", "a100", "b200") if f in name), name.replace(" ", "-"))
    count = torch.cuda.device_count()
    return family if count == 1 else f"{family}-x{count}"


def machine_info(device: torch.device) -> dict:
    """A dict recorded beside every benchmark result."""
    info = {
        "kind": machine_kind(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
