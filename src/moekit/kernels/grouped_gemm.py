"""grouped_gemm: every expert's GEMM (a[rows of e] @ b[e].T) in one persistent Triton launch.

Rows of `a` are sorted by expert; expert e owns rows expert_offsets[e]:expert_offsets[e+1]. The per-expert
row counts live on the device, so the launcher cannot size the grid by them without a host sync (which would
also break CUDA-graph capture). Instead the grid is a fixed number of persistent programs (one per SM at
most), and the kernel itself turns the offsets into a tile table: expert e has cdiv(count_e, BLOCK_M) m-tiles
times cdiv(N_OUT, BLOCK_N) n-tiles, laid out expert after expert in one linear index space. Program p takes
tiles p, p + P, p + 2P, ... and finds a tile's expert as the number of experts whose tiles all end at or
before it (one vector compare and sum over the cumulative tile counts: a branch-free search).

With swiglu the weight holds gate rows [0, F) and up rows [F, 2F); each tile accumulates both halves from the
same A loads and stores silu(gate) * up, so the [M, 2F] intermediate never reaches memory (unless training
asks for it: gate_up_out). grouped_gemm_swiglu_backward runs the down projection's input gradient through the
same kernel with SwiGLU's backward in its epilogue.

On Hopper the operand tiles come through tensor descriptors (TMA, the copy engine) wherever a and b are
contiguous along K (tma_loads): a tile then reads whole rows and columns, the next expert's included, and only
the tile's own are stored. On an H200 at T = 8192 (tools/backward_pieces.py) that took the gate/up GEMM from 400
to 515 TFLOP/s at DeepSeek-V3's shape (torch._grouped_mm: 455) and from 499 to 604 at Mixtral's. The masked
pointer loads remain for the rest (transposed weights in the backward, the interpreter, older GPUs).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OFFSET_DTYPES = (torch.int32, torch.int64)

# triton.jit reads TRITON_INTERPRET when the kernel is decorated, so the launcher must read it at import too
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the interpreter runs programs one after another on the host: a few of them still exercise the persistent
# loop (several tiles per program, programs with no tile) without paying for idle ones
_INTERPRETER_PROGRAMS = 4

# swizzle width: this many m-tiles of one expert share each sweep over its n-tiles (see the kernel)
_GROUP_M = 8

# rows stored at row_addresses start at multiples of this many bytes when their length is one (16: one
# vectorised store of 8 bf16 elements); the kernel is told so
_ALIGNED_ROW_BYTES = 16


def tile_configs(tuned: list[tuple[dict, int, int]], *, interpreter: tuple, correctness: tuple) -> list[triton.Config]:
    """The autotune configs of moekit's grouped kernels, each (block sizes, num_warps, num_stages): under
    TRITON_INTERPRET=1 only `interpreter` (the interpreter is slow and ignores warps and stages: small blocks keep
    the masked edges in play); with MOEKIT_GROUPED_GEMM_TUNE=0 only `correctness`, for the correctness runs on the
    GPU (nox -s gpu's unit tests: autotuning compiles every config for every drawn shape, 90 s and more per test;
    the perf suite and benchmarks tune); `tuned` otherwise."""
    if _INTERPRET:
        chosen = [interpreter]
    elif os.environ.get("MOEKIT_GROUPED_GEMM_TUNE") == "0":
        chosen = [correctness]
    else:
        chosen = tuned
    return [triton.Config(dict(blocks), num_warps=w, num_stages=s) for blocks, w, s in chosen]


def _configs() -> list[triton.Config]:
    # Hopper (228 KiB shared memory, 64K registers per SM): 64-wide K steps for 128-byte fp16/bf16 rows,
    # wide tiles for large-M prefill, 64-row tiles for the many small experts, and 16/32-row tiles for
    # decode, where an expert sees a handful of rows and the kernel only streams its weights
    shapes = [
        (16, 128, 128, 4, 4),
        (16, 256, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ]
    return tile_configs(
        [({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w, s) for bm, bn, bk, w, s in shapes],
        interpreter=({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, 4, 1),
        correctness=({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
    )


def _prune_configs(configs, named_args, **kwargs):
    """Drop the configs that ptxas would make spill (checked by compiling for sm_90a).

    Tensor-core dots (fp16/bf16, tf32) afford 128 fp32 accumulator values per thread, half the 255 registers;
    SwiGLU holds two accumulators, so it halves the tile a config can afford. float32 inputs take the exact
    (FMA, "ieee") dot, whose operands also sit in registers: only 64 x 64 tiles stay clear of spills.
    Prefill-sized experts also skip the decode tiles, which lose there and would only cost compile time.
    """
    args = {**named_args, **kwargs}
    accumulators = 2 if args.get("SWIGLU") or args.get("SWIGLU_BACKWARD") else 1
    if args.get("DOT_PRECISION") == "ieee":
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    else:
        kept = [
            c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * accumulators <= 128 * 32 * c.num_warps
        ]
    if args.get("ROWS_PER_EXPERT", 0) >= 256:  # prefill: 16/32-row decode tiles only re-read the weights
        kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 64] or kept
    return kept or configs


@triton.jit
def _tile_table(offsets_ptr, E, num_n_tiles, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(tiles [BLOCK_E], tiles_end [BLOCK_E]): each expert's tile count and the running sum through it.

    Slots past E count zero tiles. A decreasing pair of offsets (a caller's bug) counts zero tiles rather
    than a negative number, which would move later experts' tiles onto the wrong rows.
    """
    idx = tl.arange(0, BLOCK_E)
    start = tl.load(offsets_ptr + idx, mask=idx < E, other=0).to(tl.int32)
    end = tl.load(offsets_ptr + idx + 1, mask=idx < E, other=0).to(tl.int32)
    tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M) * num_n_tiles
    return tiles, tl.cumsum(tiles, axis=0)


def _quick_bench(kernel_call, quantiles):
    # 5 + 25 ms per config instead of do_bench's 25 + 100: a new shape tunes in a third of a second, and a
    # prefill-sized GEMM still runs 10+ times per config
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def _grouped_gemm_body(
    a_ptr,
    b_ptr,
    offsets_ptr,
    scale_ptr,
    out_ptr,
    row_address_ptr,
    gate_up_ptr,
    activation_ptr,
    d_scale_ptr,
    address_base,
    M,
    E,
    N,
    K,
    N_OUT,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_om,
    stride_on,
    stride_gm,
    ROWS_PER_EXPERT,  # only in the autotune key: decode and prefill want different tiles
    SWIGLU: tl.constexpr,
    SAVE_GATE_UP: tl.constexpr,
    SWIGLU_BACKWARD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ROW_ADDRESSES: tl.constexpr,
    ELEMENT_BYTES: tl.constexpr,
    ADDRESS_ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    num_n_tiles = tl.cdiv(N_OUT, BLOCK_N)
    tiles, tiles_end = _tile_table(offsets_ptr, E, num_n_tiles, BLOCK_M, BLOCK_E)
    total_tiles = tl.sum(tiles)

    offs_k = tl.arange(0, BLOCK_K)
    if TMA:  # Hopper's copy engine loads the operand tiles (K and the rows past a tensor's end read as zeros)
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        if B_TRANSPOSED:  # b is a transposed view of [E, K, N]: one expert per descriptor slice, K bounded in it
            b_desc = tl.make_tensor_descriptor(b_ptr, [E, K, N], [stride_be, stride_bk, 1], [1, BLOCK_K, BLOCK_N])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, [E * N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K])
    # a while loop, not range(): the bound is a device value, and the interpreter's program id is not an index
    tile = tl.program_id(0)
    while tile < total_tiles:
        # the table is rebuilt per tile (BLOCK_E cached loads) rather than held in registers across the K loop
        tiles, tiles_end = _tile_table(offsets_ptr, E, num_n_tiles, BLOCK_M, BLOCK_E)
        before = tiles_end <= tile  # experts whose tiles all precede this one; empty experts fall out by themselves
        e = tl.sum(before.to(tl.int32))
        local = tile - tl.sum(tl.where(before, tiles, 0))
        row_start = tl.load(offsets_ptr + e).to(tl.int32)
        row_end = tl.load(offsets_ptr + e + 1).to(tl.int32)
        num_m_tiles = tl.cdiv(row_end - row_start, BLOCK_M)

        # Swizzle inside the expert: groups of GROUP_M m-tiles, m fastest within a group. Programs that run at
        # the same time hold consecutive tiles, so up to GROUP_M of them read the same weight tile b[e, n-block]
        # and each A row block is reused across the group's n-tiles: both stay in L2 instead of b[e] (often
        # larger than L2 at prefill sizes) being streamed once per m-tile.
        tiles_per_group = GROUP_M * num_n_tiles
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

        a_ptrs = a_ptr + rows64[:, None] * stride_am + offs_k[None, :] * stride_ak
        # the B tile is loaded as [BLOCK_K, BLOCK_N] so tl.dot computes a @ b[e].T without a transpose
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + cols64[None, :] * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWIGLU:
            up_ptrs = b_ptrs + N_OUT * stride_bn
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k0 * BLOCK_K
            if TMA:  # whole tiles: the next expert's rows and columns past N_OUT land in rows and columns not stored
                a_tile = a_desc.load([row_start + pid_m * BLOCK_M, k0 * BLOCK_K])
                b_tile = _load_b_tile(b_desc, e, N, pid_n * BLOCK_N, k0 * BLOCK_K, B_TRANSPOSED)
            else:
                a_tile = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b_tile = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a_tile, b_tile, acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                if TMA:
                    up_tile = _load_b_tile(b_desc, e, N, N_OUT + pid_n * BLOCK_N, k0 * BLOCK_K, B_TRANSPOSED)
                else:
                    up_tile = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc_up = tl.dot(a_tile, up_tile, acc_up, input_precision=DOT_PRECISION)
                up_ptrs += BLOCK_K * stride_bk
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        tile_ok = row_ok[:, None] & col_ok[None, :]
        gate_up_ptrs = gate_up_ptr + rows64[:, None] * stride_gm + cols64[None, :]  # gate; up is N_OUT further
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows64, mask=row_ok, other=0.0)
        if SWIGLU:
            if SAVE_GATE_UP:  # kept for the backward
                tl.store(gate_up_ptrs, acc.to(gate_up_ptr.dtype.element_ty), mask=tile_ok)
                tl.store(gate_up_ptrs + N_OUT, acc_up.to(gate_up_ptr.dtype.element_ty), mask=tile_ok)
            acc = acc * tl.sigmoid(acc) * acc_up
        if SWIGLU_BACKWARD:
            # acc is d(activation) of the unscaled output, activation = silu(gate) * up recomputed from the saved
            # gate_up; out gets d gate (these columns) and d up (N_OUT further), activation_ptr the activation
            # times the row scale (the down weight's gradient reads it), d_scale_ptr each row's <activation, acc>
            gate = tl.load(gate_up_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
            up = tl.load(gate_up_ptrs + N_OUT, mask=tile_ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            activation = silu * up
            if HAS_SCALE:
                tl.atomic_add(d_scale_ptr + rows64, tl.sum(activation * acc, axis=1), mask=row_ok, sem="relaxed")
                acc = acc * scale[:, None]
                activation = activation * scale[:, None]
            tl.store(
                activation_ptr + rows64[:, None] * stride_om + cols64[None, :] * stride_on,
                activation.to(activation_ptr.dtype.element_ty),
                mask=tile_ok,
            )
            d_up = acc * silu
            acc = acc * up * (sig + silu * (1.0 - sig))
            tl.store(out_ptr + rows64[:, None] * stride_gm + (cols64 + N_OUT)[None, :],
                     d_up.to(out_ptr.dtype.element_ty), mask=tile_ok)  # fmt: skip
        elif HAS_SCALE:
            acc = acc * scale[:, None]
        if ROW_ADDRESSES:  # each row to its own place, a peer's buffer maybe; address 0: not stored
            address = tl.load(row_address_ptr + rows64, mask=row_ok, other=0)
            row_ok = row_ok & (address != 0)
            # as element offsets from out_ptr with their alignment, so the stores are vectorised (a pointer
            # cast from an integer would get one store per element)
            row_start = tl.multiple_of((address - address_base) // ELEMENT_BYTES, ADDRESS_ALIGN)
            out_ptrs = out_ptr + row_start[:, None] + cols64[None, :]
        elif SWIGLU_BACKWARD:  # out is d gate_up [M, 2F], laid out as gate_up
            out_ptrs = out_ptr + rows64[:, None] * stride_gm + cols64[None, :]
        else:
            out_ptrs = out_ptr + rows64[:, None] * stride_om + cols64[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        tile += tl.num_programs(0)


@triton.jit
def _load_b_tile(b_desc, e, N, col, k, B_TRANSPOSED: tl.constexpr):
    """Expert e's weight tile as [BLOCK_K, BLOCK_N] at (k, col), through the descriptor of _grouped_gemm_body."""
    if B_TRANSPOSED:  # one return: a jit function's code after a constexpr-true branch's return still compiles
        tile = b_desc.load([e, k, col])
        tile = tl.reshape(tile, tile.shape[1:])
    else:
        tile = b_desc.load([e * N + col, k]).T
    return tile


_AUTOTUNE = dict(
    configs=_configs(),
    key=["N", "K", "SWIGLU", "SAVE_GATE_UP", "SWIGLU_BACKWARD", "ROWS_PER_EXPERT", "TMA", "B_TRANSPOSED"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_quick_bench,
)
_grouped_gemm_kernel = triton.autotune(**_AUTOTUNE)(_grouped_gemm_body)
# the backward's row-scale gradient is summed with atomics over n-tiles: zeroed before every autotuning run
_grouped_gemm_backward_kernel = triton.autotune(**_AUTOTUNE, reset_to_zero=["d_scale_ptr"])(_grouped_gemm_body)


def copy_engine_loads(device: torch.device) -> bool:
    """Whether the grouped kernels may load their operand tiles through tensor descriptors (Hopper's copy engine)
    on device: compiled for compute capability 9.0 or newer, unless MOEKIT_TMA=0 (the pointer loads, to compare)."""
    if os.environ.get("MOEKIT_TMA") == "0" or _INTERPRET:
        return False
    return _capability(device_index(device)) >= (9, 0)


def row_descriptors(*tensors: torch.Tensor) -> bool:
    """Whether every tensor can be read through a tensor descriptor of its last two dimensions (where
    copy_engine_loads allows them): contiguous along the last one, 16-byte aligned base and rows. Sets the scratch
    memory the programs write their descriptors in."""
    rows_aligned = all(t.stride(-1) == 1 and (t.stride(-2) * t.element_size()) % 16 == 0 for t in tensors)
    bases_aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
    if not (rows_aligned and bases_aligned and copy_engine_loads(tensors[0].device)):
        return False
    triton.set_allocator(_DescriptorScratch(tensors[0].device))
    return True


def tma_loads(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Tensor-descriptor loads of a [M, K] and b [E, N, K]: row_descriptors for both, and b's experts stacked (b
    read as [E * N, K])."""
    return b.stride(0) == b.shape[1] * b.stride(1) and row_descriptors(a, b)


def transposed_tma_loads(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Tensor-descriptor loads of a [M, K] and b [E, N, K] given as the transposed view of an [E, K, N] weight
    (the backward's input gradients): row_descriptors for a and that weight, whose expert stride is aligned too."""
    weight = b.transpose(1, 2)
    return (weight.stride(0) * weight.element_size()) % 16 == 0 and row_descriptors(a, weight)


@dataclasses.dataclass(frozen=True)
class _DescriptorScratch:
    """Global memory for the programs' tensor descriptors (triton.set_allocator), on the launch's device: an
    expert-parallel rank's tensors need not be on the current device."""

    device: torch.device

    def __call__(self, size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=self.device)


def device_index(device: torch.device) -> int:
    """A CUDA device's index, the current device's for a bare "cuda"."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_args(a, b, expert_offsets, swiglu, row_scale, out, row_addresses) -> int:
    """Raise on a bad argument; return the output width (N, or F = N / 2 with swiglu)."""
    _check_tensor("a", a)
    _check_tensor("b", b)
    _check_tensor("expert_offsets", expert_offsets)
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D (M, K), got shape {tuple(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"b must be 3-D (E, N, K), got shape {tuple(b.shape)}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"a must be float16, bfloat16 or float32, got {a.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype {a.dtype}, got {b.dtype}")
    M, K = a.shape
    E, N, _ = b.shape
    if b.shape[2] != K:
        raise ValueError(f"b must have shape (E, N, K) with K = a.shape[1] = {K}, got {tuple(b.shape)}")
    if expert_offsets.dtype not in OFFSET_DTYPES:
        raise TypeError(f"expert_offsets must be int32 or int64, got {expert_offsets.dtype}")
    if tuple(expert_offsets.shape) != (E + 1,):
        raise ValueError(f"expert_offsets must have shape (E + 1,) = ({E + 1},), got {tuple(expert_offsets.shape)}")
    if not isinstance(swiglu, bool):
        raise TypeError(f"swiglu must be a bool, got {type(swiglu).__name__}")
    if swiglu and N % 2:
        raise ValueError(f"swiglu needs b's N = 2F (gate rows then up rows) to be even, got N = {N}")
    n_out = N // 2 if swiglu else N
    named = [("b", b), ("expert_offsets", expert_offsets)]
    if row_scale is not None:
        _check_tensor("row_scale", row_scale)
        if tuple(row_scale.shape) != (M,):
            raise ValueError(f"row_scale must have shape (M,) = ({M},), got {tuple(row_scale.shape)}")
        if row_scale.dtype != torch.float32:
            raise TypeError(f"row_scale must be float32, got {row_scale.dtype}")
        named.append(("row_scale", row_scale))
    if row_addresses is not None:
        _check_tensor("row_addresses", row_addresses)
        if tuple(row_addresses.shape) != (M,) or row_addresses.dtype != torch.int64:
            raise ValueError(f"row_addresses must be int64 of shape (M,) = ({M},), got {row_addresses.dtype} "
                             f"{tuple(row_addresses.shape)}")  # fmt: skip
        if out is not None:
            raise ValueError("pass out or row_addresses, not both")
        named.append(("row_addresses", row_addresses))
    if out is not None:
        _check_tensor("out", out)
        if tuple(out.shape) != (M, n_out):
            raise ValueError(
                f"out must have shape (M, {'F' if swiglu else 'N'}) = ({M}, {n_out}), got {tuple(out.shape)}"
            )
        if out.dtype != a.dtype:
            raise TypeError(f"out must have a's dtype {a.dtype}, got {out.dtype}")
        named.append(("out", out))
    for name, tensor in named:
        if tensor.device != a.device:
            raise ValueError(f"{name} is on {tensor.device}, a is on {a.device}; all tensors must share a device")
    return n_out


def _check_device(a: torch.Tensor) -> None:
    if not _INTERPRET and a.device.type != "cuda":
        raise ValueError(f"grouped_gemm needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU), a is on {a.device}")


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    swiglu: bool = False,
    row_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    row_addresses: torch.Tensor | None = None,
    gate_up_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """out[r] = a[r] @ b[e].T for every row r of expert e, all experts in one launch, without a host sync.

    Args:
        a: [M, K] float16/bfloat16/float32, rows sorted by expert: expert e owns rows
            expert_offsets[e]:expert_offsets[e+1].
        b: [E, N, K], a's dtype: each expert's weight, applied as a @ b[e].T (K contiguous is the fast layout).
        expert_offsets: [E + 1] int32/int64 on a's device, non-decreasing, expert_offsets[0] = 0 and
            expert_offsets[E] <= M. Not checked (that would sync with the device); offsets that break it give
            undefined results.
        swiglu: b[e] holds gate rows [0, F) then up rows [F, 2F) (N = 2F, N must be even); the result is
            silu(a @ gate.T) * (a @ up.T), the activation taken in float32 on the accumulators.
        row_scale: [M] float32, or None: each output row is multiplied by it (the router weight), in float32,
            after the activation.
        out: [M, N] (or [M, F] with swiglu), a's dtype, or None to allocate one. Any strides.
        row_addresses: [M] int64, or None: row r is stored at this device address instead (N_OUT contiguous
            elements of a's dtype; 0: not stored), e.g. its slot in a peer's symmetric buffer, mapped here
            (the fused combine of moekit.ep.symmetric_triton). Not checked; nothing is returned then.
            When a row's bytes are a multiple of 16, every address must be too (rows of a 16-byte aligned
            buffer are), so the stores can be vectorised.
        gate_up_out: [M, N] a's dtype with contiguous rows, or None; with swiglu only: also receives
            a @ b[e].T before the activation (what grouped_gemm_swiglu_backward needs), for the same rows.

    Returns:
        out: [M, N] (or [M, F] with swiglu), a's dtype, accumulated in float32 (tf32 is not used for
        float32 inputs). Only rows [0, expert_offsets[E]) are written: rows from expert_offsets[E] to M
        (padding) keep whatever a given `out` held, and are unspecified (uninitialised memory) in an
        allocated one.

    The first call for each (N, K, swiglu, dtypes) benchmarks the autotuning configs on the GPU, which
    synchronises: make that call before capturing a CUDA graph. Later calls launch one kernel and nothing else.
    """
    n_out = _check_args(a, b, expert_offsets, swiglu, row_scale, out, row_addresses)
    if gate_up_out is not None:
        if not swiglu:
            raise ValueError("gate_up_out keeps the pre-activation of swiglu: pass swiglu=True with it")
        _check_rows("gate_up_out", gate_up_out, (a.shape[0], b.shape[1]), a)
    _check_device(a)
    if out is None and row_addresses is None:
        out = torch.empty((a.shape[0], n_out), dtype=a.dtype, device=a.device)
    stores_to = out if out is not None else a  # with row_addresses: its dtype and address are read
    _launch(
        _grouped_gemm_kernel,
        a,
        b,
        expert_offsets,
        n_out,
        stores_to,
        swiglu=swiglu,
        row_scale=row_scale,
        row_addresses=row_addresses,
        gate_up=gate_up_out,
    )
    return out


def grouped_gemm_swiglu_backward(
    d_out: torch.Tensor,
    w_down: torch.Tensor,
    expert_offsets: torch.Tensor,
    gate_up: torch.Tensor,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward of out = row_scale * (silu(gate) * up) @ w_down[e].T up to the down weight's GEMM, in one launch.

    Args:
        d_out: [M, H] the gradient of out, rows sorted by expert as in grouped_gemm.
        w_down: [E, H, F] d_out's dtype (applied transposed: d_activation = d_out @ w_down[e]).
        expert_offsets: [E + 1] as in grouped_gemm (not checked).
        gate_up: [M, 2F] d_out's dtype, contiguous rows: the pre-activation the forward kept (gate_up_out).
        row_scale: [M] float32 or None, as in the forward.

    Returns:
        (d_gate_up [M, 2F], scaled_activation [M, F], d_row_scale [M] float32 or None): the gradient of gate_up
        through SwiGLU and the row scale; row_scale * silu(gate) * up recomputed (the down weight's gradient is
        d_out.T @ it per expert); each row's <silu(gate) * up @ w_down[e].T, d_out> summed over F-tiles with
        atomics. Rows past expert_offsets[E] are unspecified in the first two and zero in the third.
    """
    _check_tensor("w_down", w_down)
    if w_down.dim() != 3:
        raise ValueError(f"w_down must be 3-D (E, H, F), got shape {tuple(w_down.shape)}")
    _check_tensor("d_out", d_out)
    if d_out.dim() != 2 or d_out.shape[1] != w_down.shape[1]:
        raise ValueError(f"d_out must be [M, H] with w_down's H = {w_down.shape[1]}, got shape {tuple(d_out.shape)}")
    b = w_down.transpose(1, 2)  # [E, F, H]: d_activation[r] = d_out[r] @ b[e].T
    n_out = _check_args(d_out, b, expert_offsets, False, row_scale, None, None)
    M = d_out.shape[0]
    _check_rows("gate_up", gate_up, (M, 2 * n_out), d_out)
    _check_device(d_out)
    d_gate_up = torch.empty_like(gate_up)
    activation = torch.empty((M, n_out), dtype=d_out.dtype, device=d_out.device)
    d_scale = torch.zeros(M, dtype=torch.float32, device=d_out.device) if row_scale is not None else None
    _launch(
        _grouped_gemm_backward_kernel,
        d_out,
        b,
        expert_offsets,
        n_out,
        activation,  # its strides are the kernel's out strides; d_gate_up is laid out as gate_up
        row_scale=row_scale,
        gate_up=gate_up,
        d_gate_up=d_gate_up,
        d_scale=d_scale,
    )
    return d_gate_up, activation, d_scale


def _check_rows(name: str, tensor, shape: tuple[int, int], a: torch.Tensor) -> None:
    _check_tensor(name, tensor)
    if tuple(tensor.shape) != shape or tensor.dtype != a.dtype or tensor.device != a.device:
        raise ValueError(f"{name} must be {a.dtype} of shape {shape} on {a.device}, "
                         f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")  # fmt: skip
    if shape[1] > 1 and tensor.stride(1) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride(1) = 1), got strides {tensor.stride()}")


def _launch(
    kernel,
    a,
    b,
    expert_offsets,
    n_out: int,
    stores_to,
    *,
    swiglu: bool = False,
    row_scale=None,
    row_addresses=None,
    gate_up=None,
    d_gate_up=None,
    d_scale=None,
) -> None:
    """Launch kernel (one of the autotuned _grouped_gemm_body wrappers) on checked arguments. With d_gate_up it
    runs SwiGLU's backward: stores_to receives the scaled activation, d_gate_up (laid out as gate_up) the gradient."""
    M, K = a.shape
    E, N, _ = b.shape
    if M == 0 or E == 0 or n_out == 0:
        return
    aligned_rows = n_out * a.element_size() % _ALIGNED_ROW_BYTES == 0
    address_align = _ALIGNED_ROW_BYTES // a.element_size() if aligned_rows else 1  # in elements

    if _INTERPRET:
        programs = _INTERPRETER_PROGRAMS
    else:
        programs = _sm_count(device_index(a.device))
    tma = tma_loads(a, b)
    b_transposed = not tma and transposed_tma_loads(a, b)

    def grid(meta):
        # sum_e cdiv(count_e, BLOCK_M) < M / BLOCK_M + E: a host-side bound on the tile count that needs no
        # sync, so small problems do not launch programs that would find no tile
        most_tiles = (triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(n_out, meta["BLOCK_N"])
        return (min(programs, most_tiles),)

    def given(tensor):  # pointers a flag leaves unread point at the output
        return tensor if tensor is not None else stores_to

    kernel[grid](
        a,
        b,
        expert_offsets,
        given(row_scale),
        given(d_gate_up),
        given(row_addresses),
        given(gate_up),
        stores_to,  # the activation of the backward
        given(d_scale),
        stores_to.data_ptr(),
        M,
        E,
        N,
        K,
        n_out,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        stores_to.stride(0),
        stores_to.stride(1),
        gate_up.stride(0) if gate_up is not None else 0,
        min(triton.next_power_of_2(triton.cdiv(M, E)), 4096),  # a power-of-two bucket: few autotune runs
        SWIGLU=swiglu,
        SAVE_GATE_UP=gate_up is not None and d_gate_up is None,
        SWIGLU_BACKWARD=d_gate_up is not None,
        HAS_SCALE=row_scale is not None,
        ROW_ADDRESSES=row_addresses is not None,
        ELEMENT_BYTES=a.element_size(),
        ADDRESS_ALIGN=address_align,
        # float32 inputs are held to float32 accuracy; tf32 would lose 13 bits of every operand
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        TMA=tma or b_transposed,
        B_TRANSPOSED=b_transposed,
        BLOCK_E=triton.next_power_of_2(E),
        GROUP_M=_GROUP_M,
    )
