"""bf16_parts_triton: moekit.weights' split of a float32 router weight into three bf16 parts (hi + mid + lo = w) in
one Triton launch. torch's form is five elementwise kernels and a cat, redone on every call (the weight may have
changed): on an H200 the router logits of a decode step took 21 us, most of it those launches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _bf16_parts_kernel(w_ptr, parts_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    w = tl.load(w_ptr + i, mask=ok)
    hi = w.to(tl.bfloat16)  # round to nearest even, as torch's .to(torch.bfloat16)
    rest = w - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    tl.store(parts_ptr + i, hi, mask=ok)
    tl.store(parts_ptr + n + i, mid, mask=ok)
    tl.store(parts_ptr + 2 * n + i, lo, mask=ok)


def bf16_parts_triton(w: torch.Tensor) -> torch.Tensor:
    """w [E, H] float32 -> [3E, H] bf16, the stack of hi, mid and lo (moekit.weights._bf16_parts), bit for bit."""
    if w.dtype != torch.float32 or w.dim() != 2:
        raise ValueError(f"w must be a 2-D float32 tensor, got {w.dim()}-D {w.dtype}")
    w = w.contiguous()
    parts = torch.empty(3 * w.shape[0], w.shape[1], dtype=torch.bfloat16, device=w.device)
    if w.numel():
        _bf16_parts_kernel[(triton.cdiv(w.numel(), _BLOCK),)](w, parts, w.numel(), BLOCK=_BLOCK)
    return parts
