"""grouped_weight_grad: every expert's weight gradient, out[e] = a[rows of e].T @ b[rows of e], in one launch.

The backward of grouped_gemm's out[r] = x[r] @ w[e].T gives w's gradient as a sum over the rows expert e owns of
d_out[r] outer x[r]: here a = d_out [M, P], b = x [M, Q], out [E, P, Q]. One program computes one output tile of
one expert, summing over that expert's rows BLOCK_M at a time (the reduction runs along the rows, so the row
counts set the loop length, not the grid: the grid is a fixed number of persistent programs, E * tiles of P *
tiles of Q known on the host, each running its tiles' row blocks as one flat loop). An expert with no rows gets a
zero gradient.

On Hopper, for 16-bit a and b contiguous along P and Q, the row blocks come through ragged tensor descriptors
(TMA with per-expert bounds, the trick of triton.tools.ragged_tma): two extra dimensions whose strides wrap
around 2**64 put an expert's first row at a fixed coordinate, so the copy engine's own bounds check zero-fills the
rows past the expert's last one and no row of the next expert reaches the sum. The masked pointer loads remain
for the rest (float32, other strides, the interpreter's fallback, older GPUs, MOEKIT_TMA=0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.grouped_gemm import (
    _GROUP_M,
    _INTERPRET,
    _INTERPRETER_PROGRAMS,
    OFFSET_DTYPES,
    SUPPORTED_DTYPES,
    _quick_bench,
    _sm_count,
    device_index,
    row_descriptors,
    tile_configs,
)

# the ragged descriptors' wrapped dimensions (triton.tools.ragged_tma): coordinates below 2**30 along the row
# dimension, and strides of 2**34 - stride that wrap a coordinate of 2**30 around to -2**30 rows
_RAGGED_ROWS = tl.constexpr(2**30)
_RAGGED_WRAP = tl.constexpr(2**34)
_RAGGED_MAX = tl.constexpr(0x7FFF0000)


def _configs() -> list[triton.Config]:
    # (BLOCK_P, BLOCK_Q, BLOCK_M, warps, stages, programs per SM): two programs share an SM where their
    # shared memory fits twice, so one's gradient stores overlap the other's dots (on an H200 at Qwen3-30B-A3B's
    # dW_down, T = 4096: 423 TFLOP/s against the best one-program config's 409, tools/wgrad_configs.py)
    shapes = [
        (128, 256, 64, 8, 3, 1),
        (128, 128, 64, 8, 3, 1),
        (128, 128, 64, 4, 4, 1),
        (128, 128, 32, 4, 4, 1),
        (64, 128, 64, 4, 4, 1),
        (64, 64, 64, 4, 3, 1),
        (128, 128, 64, 8, 4, 1),
        (128, 256, 64, 8, 4, 1),
        (128, 128, 64, 8, 3, 2),
        (128, 128, 64, 4, 3, 2),
        (128, 128, 32, 8, 4, 2),
        (64, 128, 64, 4, 4, 2),
    ]
    return tile_configs(
        [({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_M": bm, "PROGRAMS_PER_SM": n}, w, s) for bp, bq, bm, w, s, n in shapes],
        interpreter=({"BLOCK_P": 16, "BLOCK_Q": 16, "BLOCK_M": 16, "PROGRAMS_PER_SM": 1}, 4, 1),
        correctness=({"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_M": 32, "PROGRAMS_PER_SM": 1}, 4, 3),  # grouped_gemm's
    )


def _prune_configs(configs, named_args, **kwargs):
    """As grouped_gemm's: 128 float32 accumulators per thread at most on the tensor cores, 64 x 64 for ieee."""
    args = {**named_args, **kwargs}
    if args.get("DOT_PRECISION") == "ieee":
        kept = [c for c in configs if c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"] <= 64 * 64]
    else:
        kept = [c for c in configs if c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"] <= 128 * 32 * c.num_warps]
    return kept or configs


@triton.autotune(
    configs=_configs(),
    key=["P", "Q", "ROWS_PER_EXPERT", "TMA"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_quick_bench,
)
@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr,
    b_ptr,
    offsets_ptr,
    out_ptr,
    E,
    P,
    Q,
    stride_am,
    stride_ap,
    stride_bm,
    stride_bq,
    stride_oe,
    stride_op,
    stride_oq,
    ROWS_PER_EXPERT,  # only in the autotune key
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_P: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # only in the grid
):
    num_p_tiles = tl.cdiv(P, BLOCK_P)
    num_q_tiles = tl.cdiv(Q, BLOCK_Q)
    tiles_per_expert = num_p_tiles * num_q_tiles
    programs = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    if TMA:
        a_desc = _ragged_descriptor(a_ptr, P, stride_am, BLOCK_M, BLOCK_P)
        b_desc = _ragged_descriptor(b_ptr, Q, stride_bm, BLOCK_M, BLOCK_Q)
    # One flat loop over this program's (tile, row block) steps, not a loop over tiles around a loop over row
    # blocks: Triton pipelines a for loop, and a small expert has two or three row blocks per tile, so the next
    # tile's first loads must be in flight during this tile's last dot (on an H200 at DeepSeek-V3's shape,
    # T = 4096, nested loops ran dW_gate_up at 218 TFLOP/s, this loop at 285, torch._grouped_mm at 283; at
    # Qwen3-30B-A3B's 338 -> 408 against 382). Tile t's expert owns
    # max(1, cdiv(rows, BLOCK_M)) steps: an expert with no rows takes one step of zeros, which stores its zeros.
    steps = _steps_of_program(offsets_ptr, E, tiles_per_expert, tl.program_id(0), programs, BLOCK_M, BLOCK_E)
    tile = tl.program_id(0) - programs
    e, pid_p, pid_q, row_start, row_end, blocks = _tile_of(
        tl.program_id(0), offsets_ptr, E, tiles_per_expert, num_p_tiles, num_q_tiles, GROUP_P, BLOCK_M
    )
    block = blocks - 1  # as if a tile had just ended: the first step moves to this program's first tile
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for _ in range(0, steps):
        block = tl.where(block == blocks - 1, 0, block + 1)
        if block == 0:
            tile += programs
            e, pid_p, pid_q, row_start, row_end, blocks = _tile_of(
                tile, offsets_ptr, E, tiles_per_expert, num_p_tiles, num_q_tiles, GROUP_P, BLOCK_M
            )
        row = row_start + block * BLOCK_M
        p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
        p_ok = p < P
        q_ok = q < Q
        if TMA:  # rows from row_end on read as zeros
            a_tile = _load_ragged(a_desc, row_end, row, pid_p * BLOCK_P).T
            b_tile = _load_ragged(b_desc, row_end, row, pid_q * BLOCK_Q)
        else:
            rows = row + offs_m
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            # a's tile loaded as [BLOCK_P, BLOCK_M]: the dot reduces over the rows without a transpose
            a_tile = tl.load(
                a_ptr + rows64[None, :] * stride_am + p[:, None] * stride_ap,
                mask=p_ok[:, None] & row_ok[None, :],
                other=0.0,
            )
            b_tile = tl.load(
                b_ptr + rows64[:, None] * stride_bm + q[None, :] * stride_bq,
                mask=row_ok[:, None] & q_ok[None, :],
                other=0.0,
            )
        acc = tl.dot(a_tile, b_tile, acc, input_precision=DOT_PRECISION)
        if block == blocks - 1:
            out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + p[:, None] * stride_op + q[None, :] * stride_oq
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])
            acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)


@triton.jit
def _steps_of_program(offsets_ptr, E, tiles_per_expert, pid, programs, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """How many steps program pid takes: over the experts, its tiles pid + j * programs among the expert's
    [e * tiles_per_expert, (e + 1) * tiles_per_expert) times the expert's steps per tile."""
    experts = tl.arange(0, BLOCK_E)
    valid = experts < E
    start = tl.load(offsets_ptr + experts, mask=valid, other=0).to(tl.int32)
    end = tl.load(offsets_ptr + experts + 1, mask=valid, other=0).to(tl.int32)
    blocks = _steps_per_tile(start, end, BLOCK_M)
    first = experts * tiles_per_expert
    last = first + tiles_per_expert - 1
    j_first = tl.where(first > pid, (first - pid + programs - 1) // programs, 0)
    j_last = tl.where(last >= pid, (last - pid) // programs, -1)
    tiles = tl.where(valid, tl.maximum(j_last - j_first + 1, 0), 0)
    return tl.sum(tiles * blocks)


@triton.jit
def _tile_of(tile, offsets_ptr, E, tiles_per_expert, num_p_tiles, num_q_tiles, GROUP_P: tl.constexpr,
             BLOCK_M: tl.constexpr):  # fmt: skip
    """(expert, p-tile, q-tile, its first row, its row end, steps) of a linear tile index."""
    e = tl.minimum(tile // tiles_per_expert, E - 1)
    local = tile % tiles_per_expert
    # grouped order (as grouped_gemm's): consecutive programs share b's q-block and a's few p-blocks
    tiles_per_group = GROUP_P * num_q_tiles
    first_p = (local // tiles_per_group) * GROUP_P
    group_rows = tl.minimum(num_p_tiles - first_p, GROUP_P)
    pid_p = first_p + (local % tiles_per_group) % group_rows
    pid_q = (local % tiles_per_group) // group_rows
    row_start = tl.load(offsets_ptr + e).to(tl.int32)
    row_end = tl.load(offsets_ptr + e + 1).to(tl.int32)
    return e, pid_p, pid_q, row_start, row_end, _steps_per_tile(row_start, row_end, BLOCK_M)


@triton.jit
def _steps_per_tile(row_start, row_end, BLOCK_M: tl.constexpr):
    """Row blocks of an expert's rows row_start:row_end, and one (of zeros) for an expert with none."""
    return tl.maximum(tl.cdiv(tl.maximum(row_end - row_start, 0), BLOCK_M), 1)


@triton.jit
def _ragged_descriptor(base_ptr, width, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """A descriptor of the [rows, width] tensor at base_ptr, as 4-D (wrap, end row, row, column) coordinates
    that _load_ragged fills in: the address is (end row - (2**30 - row coordinate)) rows on, and only the row
    coordinate's bound (2**30) is checked, so rows from the end row on read as zeros."""
    stride = stride_row.to(tl.int64)
    return tl.make_tensor_descriptor(
        base_ptr,
        [_RAGGED_MAX, _RAGGED_MAX, _RAGGED_ROWS, width],
        [_RAGGED_WRAP - stride, stride, stride, 1],
        [1, 1, BLOCK_ROWS, BLOCK_COLS],
    )


@triton.jit
def _load_ragged(desc, row_end, row, col):
    """The [BLOCK_ROWS, BLOCK_COLS] tile at (row, col), zeros from row row_end on."""
    tile = desc.load([_RAGGED_ROWS, row_end, _RAGGED_ROWS - (row_end - row), col])
    return tl.reshape(tile, tile.shape[2:])


def _check_args(a, b, expert_offsets) -> None:
    for name, value in (("a", a), ("b", b), ("expert_offsets", expert_offsets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D (M, P) and (M, Q), got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same rows M, got {a.shape[0]} and {b.shape[0]}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"a must be float16, bfloat16 or float32, got {a.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype {a.dtype}, got {b.dtype}")
    if expert_offsets.dim() != 1 or expert_offsets.shape[0] < 1 or expert_offsets.dtype not in OFFSET_DTYPES:
        raise ValueError(f"expert_offsets must be int32 or int64 of shape (E + 1,), got {expert_offsets.dtype} "
                         f"{tuple(expert_offsets.shape)}")  # fmt: skip
    for name, tensor in (("b", b), ("expert_offsets", expert_offsets)):
        if tensor.device != a.device:
            raise ValueError(f"{name} is on {tensor.device}, a is on {a.device}; all tensors must share a device")
    if not _INTERPRET and a.device.type != "cuda":
        raise ValueError(f"grouped_weight_grad needs CUDA tensors (or TRITON_INTERPRET=1), a is on {a.device}")


def grouped_weight_grad(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """out[e] = a[rows of e].T @ b[rows of e], accumulated in float32, for every expert in one launch.

    Args:
        a: [M, P] float16/bfloat16/float32, rows sorted by expert (expert e owns rows
            expert_offsets[e]:expert_offsets[e+1]; rows from expert_offsets[E] on are not read).
        b: [M, Q], a's dtype, the same rows.
        expert_offsets: [E + 1] int32/int64 on a's device, non-decreasing from 0 (not checked: a host sync).

    Returns:
        out: [E, P, Q] in a's dtype; an expert with no rows gets zeros. For w [E, P, Q] applied as
        x @ w[e].T, a = d_out [M, P] and b = x [M, Q] give w's gradient.
    """
    _check_args(a, b, expert_offsets)
    (M, P), Q, E = a.shape, b.shape[1], expert_offsets.shape[0] - 1
    out = torch.empty((E, P, Q), dtype=a.dtype, device=a.device)
    if E == 0 or P == 0 or Q == 0:
        return out
    if M == 0:
        return out.zero_()
    if _INTERPRET:
        programs = _INTERPRETER_PROGRAMS
    else:
        programs = _sm_count(device_index(a.device))

    def grid(meta):
        tiles = E * triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"])
        return (min(programs * meta["PROGRAMS_PER_SM"], tiles),)

    _grouped_weight_grad_kernel[grid](
        a,
        b,
        expert_offsets,
        out,
        E,
        P,
        Q,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        min(triton.next_power_of_2(triton.cdiv(M, E)), 4096),
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        # float32 stays on the pointer loads: its exact dot does not take the transposed descriptor tile
        TMA=a.dtype != torch.float32 and row_descriptors(a, b),
        BLOCK_E=triton.next_power_of_2(E),
        GROUP_P=_GROUP_M,  # p-tiles of one expert per sweep over its q-tiles: b's row blocks stay in L2
    )
    return out
