"""Fixed-size messages over symmetric memory: every rank sends one message to every rank, then signals.

Rank p's message q (block q of its send buffer [W, message_elems]) lands in block p of rank q's receive
buffer [W, block_elems] (block_elems >= message_elems; the elements past the message are left as they
are), addressed through an int64 table [W] of every rank's copy (NVLink-mapped: what torch's symmetric
memory hands out). One launch moves one or two messages per destination (a dispatcher's rows and their
metadata), and one signal covers both: once every program is done, the last one stores the epoch
(a host int every rank advances in step) into flag p of every rank's flags int32 [W], with release
semantics, so a rank that reads its flag p >= epoch with acquire semantics sees p's message.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.kernels.peer_puts import last_to_finish

_BLOCK = 4096  # elements one program moves per step: 16 KiB of float32, wide vector loads and stores
_ENOUGH_PROGRAMS = 512  # about four per SM of an H200 (132 SMs), over all destination ranks


@triton.jit
def _copy_message(send_ptr, recv_table, message_elems, recv_offset, q, BLOCK: tl.constexpr):
    """This program's chunks (a stride of BLOCK-element chunks) of message q: send[q] -> rank q's receive
    buffer from element recv_offset on (this rank's block)."""
    src = send_ptr + q.to(tl.int64) * message_elems
    dst = tl.load(recv_table + q).to(tl.pointer_type(send_ptr.dtype.element_ty)) + recv_offset
    for start in range(tl.program_id(1) * BLOCK, message_elems, tl.num_programs(1) * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < message_elems
        tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["epoch"])
def _put_fixed_messages_kernel(
    send_a, table_a, elems_a, offset_a, send_b, table_b, elems_b, offset_b, flag_table, done_ptr, epoch, my_rank, W,
    BLOCK: tl.constexpr,
):  # fmt: skip
    q = tl.program_id(0)
    _copy_message(send_a, table_a, elems_a, offset_a, q, BLOCK)
    _copy_message(send_b, table_b, elems_b, offset_b, q, BLOCK)
    if last_to_finish(done_ptr, tl.num_programs(0) * tl.num_programs(1), "sys"):  # everyone's stores are seen
        for r in range(W):
            flag = tl.load(flag_table + r).to(tl.pointer_type(tl.int32)) + my_rank
            tl.atomic_xchg(flag, epoch, sem="release", scope="sys")


def put_fixed_messages(
    messages: list[tuple[torch.Tensor, torch.Tensor, int]],
    flag_table: torch.Tensor,
    done: torch.Tensor,
    epoch: int,
    my_rank: int,
    *,
    block: int = _BLOCK,
    programs_per_rank: int | None = None,
) -> None:
    """messages: one or two (send [W, message_elems] contiguous, recv_table int64 [W], block_elems): block q
    of send goes to block my_rank of rank q's receive buffer [W, block_elems]. Then epoch goes into flag
    my_rank of every rank's flags int32 [W] (flag_table int64 [W]). done: int32 [1], zero between launches
    (left zero). programs_per_rank: programs copying to one rank (default: enough to fill the GPU)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if len(messages) not in (1, 2):
        raise ValueError(f"messages must hold one or two (send, recv_table, block_elems), got {len(messages)}")
    W = flag_table.numel()
    for send, table, block_elems in messages:
        if send.dim() != 2 or send.shape[0] != W or not send.is_contiguous():
            raise ValueError(f"messages: send must be contiguous [W={W}, message_elems], got {tuple(send.shape)}")
        if table.shape != (W,) or table.dtype != torch.int64:
            raise ValueError(f"messages: recv_table must be int64 [{W}], got {table.dtype} {tuple(table.shape)}")
        if block_elems < send.shape[1]:
            raise ValueError(f"messages: block_elems {block_elems} is below the message's {send.shape[1]} elements")
    if not 0 <= my_rank < W:
        raise ValueError(f"my_rank must be in [0, {W}), got {my_rank}")
    if done.shape != (1,) or done.dtype != torch.int32:
        raise ValueError(f"done must be int32 [1], got {done.dtype} {tuple(done.shape)}")
    (send_a, table_a, block_a), (send_b, table_b, block_b) = messages[0], messages[-1]
    elems_b = send_b.shape[1] if len(messages) == 2 else 0  # one message: the second copies nothing
    largest = max(send_a.shape[1], elems_b)
    if programs_per_rank is None:
        programs_per_rank = max(1, min(triton.cdiv(largest, block), _ENOUGH_PROGRAMS // W))
    # the receive offsets are computed here: a Python int past 2**31 reaches the kernel as int64
    _put_fixed_messages_kernel[(W, programs_per_rank)](
        send_a, table_a, send_a.shape[1], my_rank * block_a, send_b, table_b, elems_b, my_rank * block_b,
        flag_table, done, epoch, my_rank, W, BLOCK=block,
    )  # fmt: skip


@triton.jit(do_not_specialize=["epoch"])
def _wait_for_messages_kernel(flags_ptr, epoch):
    flag = flags_ptr + tl.program_id(0)
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
    while seen < epoch:
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")


def wait_for_messages(flags: torch.Tensor, epoch: int) -> None:
    """flags int32 [W] (this rank's): returns once every source rank's flag reached epoch; kernels queued
    after it on the stream see those ranks' messages. One program per source rank."""
    _wait_for_messages_kernel[(flags.numel(),)](flags, epoch)
