"""The expert MLP used by the torch backends: down(silu(gate(x)) * up(x))."""

import torch
import torch.nn.functional as F


def swiglu_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [N, H], w_gate_up [2F, H] (gate rows first), w_down [H, F] -> [N, H] in x.dtype.

    Matmuls run in x.dtype; the activation runs in float32 (or wider), as the fused kernels do.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    gate, up = (x @ w_gate_up.T).to(acc).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype) @ w_down.T
