"""grouped_gemm_fp8: every expert's GEMM on FP8 (e4m3) operands with float32 scales, in one persistent launch.

The tile walk is grouped_gemm's (a tile table built from the device offsets, persistent programs, the swizzle
inside an expert); what differs is the arithmetic. Both operands are e4m3 with a float32 dequantization scale per
group of elements:
  a [M, K]: per 1 x 128 tile of a row (a_scale [M, ceil(K / 128)], "blocked") or per row (a_scale [M, 1]);
  b [E, N, K]: per 128 x 128 block (b_scale [E, ceil(N / 128), ceil(K / 128)], "blocked") or per output row
  (b_scale [E, N, 1]).
The tensor cores multiply e4m3 into float32. Where a scale changes along K (either operand blocked) each 128-wide
K step's product is scaled as it is added in (DeepSeek-V3's promotion every 128 of K, as DeepGEMM does), so the
partial sums are float32 throughout. Otherwise the tensor cores sum all of K, adding with about 14 bits of mantissa
(as Triton's default on Hopper, vLLM's FP8 MoE kernel and CUTLASS's FP8FastAccum schedules do), and the scales
multiply the finished accumulator once. On an H200 (T = 8192) that took Mixtral's gate/up from 887 to 1112
TFLOP/s and its down from 897 to 1288 against promoting every 128 of K, at 1.0e-3 (K = 2048) to 3.2e-3
(K = 14336) relative difference to the promoted sums: a tenth of e4m3's own rounding
(moekit.testing.numerics.FP8_FAST_ACCUMULATION_TOLERANCE).

Epilogues: SwiGLU (b holds gate rows then up rows, each half with its own scales), the router weight of each row,
and re-quantization of the output per 1 x 128 tile (the SwiGLU activation becomes the next GEMM's e4m3 operand
without touching memory in a wider type; an output tile holds one or two such tiles per row). A per-row scale of
that output would need the amax of every n-tile of the row, which no single tile knows; 1 x 128 tiles are what an
epilogue can compute, and they are the finer scale.

Operand tiles load through tensor descriptors on Hopper (grouped_gemm.tma_loads): whole tiles, where the rows of
the next expert and the columns past N_OUT carry the zero scales the masked scale loads give them, so they drop
out of the sums and the re-quantization's amax. On an H200 at T = 8192 (tools/fp8_pieces.py), rowwise gate/up
went from 741 to 780 TFLOP/s at Mixtral's shape and from 552 to 642 at Qwen3-30B-A3B's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.grouped_gemm import (
    _GROUP_M,
    _INTERPRET,
    _INTERPRETER_PROGRAMS,
    _quick_bench,
    _sm_count,
    _tile_table,
    device_index,
    tile_configs,
    tma_loads,
)
from moekit.kernels.quantize_rows import quantize_tile
from moekit.quantize import BLOCK_SIZE, FP8, FP8_MAX
from moekit.validation import check_tensor

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _configs() -> list[triton.Config]:
    # BLOCK_K is the scale block (one scale per operand row and K step) where a scale changes along K; under row
    # scales a K step may span two (fewer, longer steps: 3-4% on the decode GEMMs, H200). BLOCK_N is a multiple
    # of it, so that a re-quantized output tile holds whole 1 x 128 scale groups. PROGRAMS_PER_SM 2: at decode a
    # tile is a few K steps of streamed weight, so one program's pipeline ramp and epilogue dominate; a second
    # program per SM loads meanwhile (Qwen3-30B-A3B's down GEMM at T = 16: 52.9 -> 39.8 us)
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K in scale blocks, warps, stages, programs per SM
        (16, 128, 1, 4, 4, 1),  # decode: a few rows per expert, the kernel streams the weights
        (16, 128, 1, 4, 6, 1),  # the same, more loads in flight (the copy engine's tiles)
        (16, 128, 1, 4, 4, 2),
        (16, 128, 1, 4, 3, 2),
        (16, 128, 2, 4, 3, 2),
        (16, 128, 2, 4, 4, 2),
        (32, 128, 1, 4, 4, 2),
        (32, 128, 1, 4, 4, 1),
        (64, 128, 1, 4, 4, 1),
        (64, 128, 1, 4, 3, 1),
        (64, 128, 1, 4, 3, 2),
        (64, 128, 1, 8, 3, 1),
        (64, 128, 1, 8, 4, 1),
        (64, 256, 1, 8, 3, 1),
        (128, 128, 1, 8, 3, 1),
        (128, 128, 1, 8, 4, 1),
        (128, 128, 1, 4, 4, 1),
        (128, 256, 1, 8, 3, 1),
    ]
    tuned = [
        ({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk * BLOCK_SIZE, "PROGRAMS_PER_SM": n}, w, s)
        for bm, bn, bk, w, s, n in shapes
    ]
    return tile_configs(
        tuned,
        # two scale groups per tile row under the interpreter, one in the GPU's correctness config: both are tested;
        # two programs per SM under the interpreter, one in the correctness config: both grids are tested
        interpreter=({"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": BLOCK_SIZE, "PROGRAMS_PER_SM": 2}, 4, 1),
        correctness=({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": BLOCK_SIZE, "PROGRAMS_PER_SM": 1}, 4, 3),
    )


def _prune_configs(configs, named_args, **kwargs):
    """grouped_gemm's rule (a tile's fp32 accumulators within 128 registers per thread), counting SwiGLU's two
    accumulators and, where a scale changes along K, each K step's product held beside its accumulator: the
    block-scaled SwiGLU GEMM at 128 x 128 on 8 warps spilled to 194 TFLOP/s where 64 x 128 reached 394 (H200)."""
    args = {**named_args, **kwargs}
    blocked = args.get("A_BLOCKED") or args.get("B_BLOCKED")
    configs = [c for c in configs if not blocked or c.kwargs["BLOCK_K"] == BLOCK_SIZE]  # a must, not a preference
    accumulators = (2 if args.get("SWIGLU") else 1) * (2 if blocked else 1)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * accumulators <= 128 * 32 * c.num_warps]
    return kept or configs


@triton.jit
def _scaled_dot(a, b, acc, a_scale, b_scale, A_BLOCKED: tl.constexpr, B_BLOCKED: tl.constexpr):
    """acc + a @ b, the K step's product scaled as it is added where a scale is blocked (changes along K)."""
    if A_BLOCKED and B_BLOCKED:
        acc += tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])
    elif A_BLOCKED:
        acc += tl.dot(a, b) * a_scale[:, None]
    elif B_BLOCKED:
        acc += tl.dot(a, b) * b_scale[None, :]
    else:  # the tensor cores sum all of K (the scales come after)
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _scale_finished(acc, a_scale, b_scale, A_BLOCKED: tl.constexpr, B_BLOCKED: tl.constexpr):
    """The accumulator times the scales that are the same along all of K (the ones not applied per K step)."""
    if not A_BLOCKED:
        acc = acc * a_scale[:, None]
    if not B_BLOCKED:
        acc = acc * b_scale[None, :]
    return acc


@triton.autotune(
    configs=_configs(),
    key=["N", "K", "SWIGLU", "QUANTIZE_OUT", "A_BLOCKED", "B_BLOCKED", "ROWS_PER_EXPERT", "TMA"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_quick_bench,
)
@triton.jit
def _grouped_gemm_fp8_kernel(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    offsets_ptr,
    row_scale_ptr,
    out_ptr,
    out_scale_ptr,
    M,
    E,
    N,
    K,
    N_OUT,
    stride_am,
    stride_asm,
    stride_be,
    stride_bn,
    stride_bse,
    stride_bsn,
    stride_om,
    stride_osm,
    ROWS_PER_EXPERT,  # only in the autotune key: decode and prefill want different tiles
    A_BLOCKED: tl.constexpr,
    B_BLOCKED: tl.constexpr,
    SWIGLU: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    QUANTIZE_OUT: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    FP8_MAX: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # only in the grid
):
    num_n_tiles = tl.cdiv(N_OUT, BLOCK_N)
    tiles, tiles_end = _tile_table(offsets_ptr, E, num_n_tiles, BLOCK_M, BLOCK_E)
    total_tiles = tl.sum(tiles)
    offs_k = tl.arange(0, BLOCK_K)
    if TMA:  # Hopper's copy engine loads the operand tiles (K and the rows past a tensor's end read as zeros)
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, [E * N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K])
    tile = tl.program_id(0)
    while tile < total_tiles:
        tiles, tiles_end = _tile_table(offsets_ptr, E, num_n_tiles, BLOCK_M, BLOCK_E)
        before = tiles_end <= tile
        e = tl.sum(before.to(tl.int32))
        local = tile - tl.sum(tl.where(before, tiles, 0))
        row_start = tl.load(offsets_ptr + e).to(tl.int32)
        row_end = tl.load(offsets_ptr + e + 1).to(tl.int32)
        num_m_tiles = tl.cdiv(row_end - row_start, BLOCK_M)
        tiles_per_group = GROUP_M * num_n_tiles  # the swizzle of grouped_gemm
        first_m = (local // tiles_per_group) * GROUP_M
        group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
        pid_m = first_m + (local % tiles_per_group) % group_rows
        pid_n = (local % tiles_per_group) // group_rows

        rows = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        col_ok = cols < N_OUT
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        e64 = e.to(tl.int64)

        a_ptrs = a_ptr + rows64[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + e64 * stride_be + cols64[None, :] * stride_bn + offs_k[:, None]
        # scale pointers at K step 0: a row's tile scales are contiguous, a block row's too
        a_scale_ptrs = a_scale_ptr + rows64 * stride_asm
        b_scale_rows = (cols64 // SCALE_BLOCK) if B_BLOCKED else cols64
        b_scale_ptrs = b_scale_ptr + e64 * stride_bse + b_scale_rows * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_scale = tl.load(a_scale_ptrs, mask=row_ok, other=0.0)
        b_scale = tl.load(b_scale_ptrs, mask=col_ok, other=0.0)
        if SWIGLU:
            up_ptrs = b_ptrs + N_OUT * stride_bn
            up_scale_rows = ((cols64 + N_OUT) // SCALE_BLOCK) if B_BLOCKED else cols64 + N_OUT
            up_scale_ptrs = b_scale_ptr + e64 * stride_bse + up_scale_rows * stride_bsn
            up_scale = tl.load(up_scale_ptrs, mask=col_ok, other=0.0)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kb * BLOCK_K
            if TMA:  # rows of the next expert and columns past N_OUT are read: their scales (loaded as 0) drop them
                a_tile = a_desc.load([row_start + pid_m * BLOCK_M, kb * BLOCK_K])
                b_tile = b_desc.load([e * N + pid_n * BLOCK_N, kb * BLOCK_K]).T
            else:
                a_tile = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b_tile = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if A_BLOCKED:
                a_scale = tl.load(a_scale_ptrs + kb, mask=row_ok, other=0.0)
            if B_BLOCKED:
                b_scale = tl.load(b_scale_ptrs + kb, mask=col_ok, other=0.0)
            acc = _scaled_dot(a_tile, b_tile, acc, a_scale, b_scale, A_BLOCKED, B_BLOCKED)
            if SWIGLU:
                if TMA:
                    up_tile = b_desc.load([e * N + N_OUT + pid_n * BLOCK_N, kb * BLOCK_K]).T
                else:
                    up_tile = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if B_BLOCKED:
                    up_scale = tl.load(up_scale_ptrs + kb, mask=col_ok, other=0.0)
                acc_up = _scaled_dot(a_tile, up_tile, acc_up, a_scale, up_scale, A_BLOCKED, B_BLOCKED)
                up_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        acc = _scale_finished(acc, a_scale, b_scale, A_BLOCKED, B_BLOCKED)
        if SWIGLU:
            acc_up = _scale_finished(acc_up, a_scale, up_scale, A_BLOCKED, B_BLOCKED)
            acc = acc * tl.sigmoid(acc) * acc_up
        if HAS_ROW_SCALE:
            acc = acc * tl.load(row_scale_ptr + rows64, mask=row_ok, other=0.0)[:, None]
        out_ptrs = out_ptr + rows64[:, None] * stride_om + cols64[None, :]
        if QUANTIZE_OUT:  # each row of the tile is BLOCK_N // SCALE_BLOCK whole scale groups (masked columns are 0)
            GROUPS: tl.constexpr = BLOCK_N // SCALE_BLOCK
            grouped = tl.reshape(acc, (BLOCK_M, GROUPS, SCALE_BLOCK))
            out_scale, grouped = quantize_tile(grouped, tl.max(tl.abs(grouped), axis=2)[:, :, None], FP8_MAX)
            acc = tl.reshape(grouped, (BLOCK_M, BLOCK_N))
            groups = pid_n * GROUPS + tl.arange(0, GROUPS)
            scale_ptrs = out_scale_ptr + rows64[:, None] * stride_osm + groups[None, :]
            scale_ok = row_ok[:, None] & (groups[None, :] * SCALE_BLOCK < N_OUT)
            tl.store(scale_ptrs, tl.reshape(out_scale, (BLOCK_M, GROUPS)), mask=scale_ok)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        tile += tl.num_programs(0)


def _check_operand(name: str, values, scale, ndim: int) -> bool:
    """Raise on a bad e4m3 operand or scale; return whether its scale is blocked (changes along K)."""
    check_tensor(name, values, ndim=ndim, dtypes=(FP8,))
    check_tensor(f"{name}_scale", scale, ndim=ndim, dtypes=(torch.float32,))
    if values.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along K (its last dimension), got strides {values.stride()}")
    *lead, rows, K = values.shape
    blocked = (*lead, triton.cdiv(rows, BLOCK_SIZE) if ndim == 3 else rows, triton.cdiv(K, BLOCK_SIZE))
    per_row = (*lead, rows, 1)
    shape = tuple(scale.shape)
    if shape != blocked and shape != per_row:
        group = "128 x 128 block" if ndim == 3 else "1 x 128 tile"
        raise ValueError(
            f"{name}_scale must have shape {blocked} (one scale per {group}, block size {BLOCK_SIZE}) or {per_row} "
            f"(one per row) for {name} {tuple(values.shape)}, got {shape}"
        )
    return shape != per_row  # where the two shapes coincide (K <= 128) they mean the same scales


def grouped_gemm_fp8(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    swiglu: bool = False,
    row_scale: torch.Tensor | None = None,
    quantize_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out[r] = (a[r] * a_scale) @ (b[e] * b_scale).T for every row r of expert e, all experts in one launch.

    Args:
        a: [M, K] float8_e4m3fn, rows sorted by expert (expert e owns rows expert_offsets[e]:expert_offsets[e+1]).
        a_scale: float32 [M, ceil(K / 128)] (per 1 x 128 tile) or [M, 1] (per row).
        b: [E, N, K] float8_e4m3fn, K contiguous.
        b_scale: float32 [E, ceil(N / 128), ceil(K / 128)] (per 128 x 128 block) or [E, N, 1] (per row).
        expert_offsets: [E + 1] int32/int64 on a's device, non-decreasing, expert_offsets[E] <= M (not checked:
            that would sync with the device).
        out_dtype: float16/bfloat16/float32, the output's (ignored with quantize_out).
        swiglu: b[e] holds gate rows [0, F) then up rows [F, 2F); the result is silu(gate) * up [M, F].
        row_scale: [M] float32 or None: each output row times it (the router weight), after the activation.
        quantize_out: the output in e4m3 with a float32 scale per 1 x 128 tile (the next GEMM's a and a_scale).

    Returns:
        (out [M, N] or [M, F] with swiglu, out_scale [M, ceil(N_out / 128)] float32 with quantize_out, else None).
        Rows from expert_offsets[E] on are padding, left unwritten.

    The first call per shape autotunes on the GPU (a sync): make it before capturing a CUDA graph.
    """
    a_blocked = _check_operand("a", a, a_scale, 2)
    b_blocked = _check_operand("b", b, b_scale, 3)
    check_tensor("expert_offsets", expert_offsets, ndim=1, dtypes=(torch.int32, torch.int64))
    M, K = a.shape
    E, N, _ = b.shape
    if b.shape[2] != K:
        raise ValueError(f"b must have shape (E, N, K) with K = a.shape[1] = {K}, got {tuple(b.shape)}")
    if a_scale.shape[0] != M:
        raise ValueError(f"a_scale must have a's {M} rows, got {tuple(a_scale.shape)}")
    if tuple(expert_offsets.shape) != (E + 1,):
        raise ValueError(f"expert_offsets must have shape ({E + 1},), got {tuple(expert_offsets.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    if swiglu and N % 2:
        raise ValueError(f"swiglu needs b's N = 2F (gate rows then up rows) to be even, got N = {N}")
    if row_scale is not None:
        check_tensor("row_scale", row_scale, shape=(M,), dtypes=(torch.float32,))
    for name, t in (("a_scale", a_scale), ("b", b), ("b_scale", b_scale), ("expert_offsets", expert_offsets),
                    ("row_scale", row_scale)):  # fmt: skip
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device}, a is on {a.device}; all tensors must share a device")
    if not _INTERPRET and a.device.type != "cuda":
        raise ValueError(f"grouped_gemm_fp8 needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU), a is on {a.device}")
    if not _INTERPRET and torch.cuda.get_device_capability(a.device) < (8, 9):
        raise ValueError(f"grouped_gemm_fp8 needs FP8 tensor cores (compute capability 8.9 or newer), {a.device} "
                         f"has {torch.cuda.get_device_capability(a.device)}")  # fmt: skip

    n_out = N // 2 if swiglu else N
    # the interpreter converts to e4m3 wrongly: it stores float32 and torch rounds (see quantize_rows_triton)
    stored_dtype = (torch.float32 if _INTERPRET else FP8) if quantize_out else out_dtype
    out = torch.empty((M, n_out), dtype=stored_dtype, device=a.device)
    out_scale = None
    if quantize_out:
        out_scale = torch.ones((M, triton.cdiv(n_out, BLOCK_SIZE)), dtype=torch.float32, device=a.device)
    if M and E and n_out:
        if _INTERPRET:
            programs = _INTERPRETER_PROGRAMS
        else:
            programs = _sm_count(device_index(a.device))

        tma = tma_loads(a, b)

        def grid(meta):
            most_tiles = (triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(n_out, meta["BLOCK_N"])
            return (min(programs * meta["PROGRAMS_PER_SM"], most_tiles),)

        _grouped_gemm_fp8_kernel[grid](
            a,
            a_scale,
            b,
            b_scale,
            expert_offsets,
            row_scale if row_scale is not None else a_scale,  # never read without HAS_ROW_SCALE
            out,
            out_scale if out_scale is not None else a_scale,  # never written without QUANTIZE_OUT
            M,
            E,
            N,
            K,
            n_out,
            a.stride(0),
            a_scale.stride(0),
            b.stride(0),
            b.stride(1),
            b_scale.stride(0),
            b_scale.stride(1),
            out.stride(0),
            out_scale.stride(0) if out_scale is not None else 0,
            min(triton.next_power_of_2(triton.cdiv(M, E)), 4096),
            A_BLOCKED=a_blocked,
            B_BLOCKED=b_blocked,
            SWIGLU=swiglu,
            HAS_ROW_SCALE=row_scale is not None,
            QUANTIZE_OUT=quantize_out,
            SCALE_BLOCK=BLOCK_SIZE,
            FP8_MAX=FP8_MAX,
            TMA=tma,
            BLOCK_E=triton.next_power_of_2(E),
            GROUP_M=_GROUP_M,
        )
    return (out.to(FP8) if quantize_out else out), out_scale
