"""nccl: variable-size all-to-all (torch.distributed.all_to_all_single), on any backend: NCCL on GPUs,
gloo on the CPU.

Wire format, per step:
  1. counts: all_to_all_single of send_counts [W] int64 -> recv_counts [W] (the host reads both: the
     split sizes of the next two collectives).
  2. rows: all_to_all_single of x[send_token_idx] [S, H] in the dispatcher's dtype, destination-major,
     tokens ascending within a destination; each token once per destination rank.
  3. metadata: all_to_all_single of [S, 1 + 2K] int64 = (source token index, the K global expert ids,
     the K router weights as bits of the dispatcher's weight_dtype), with the same splits.
  FP8 (dispatch_quantized): step 2 sends the e4m3 values of x[send_token_idx] as uint8 [S, H] (each token
  quantized once before it is copied per destination, moekit.ep.quantized), and a step 2b their float32
  scales [S, ceil(H / 128)] ("block") or [S, 1] ("row"), with the same splits.
  combine: all_to_all_single of [sum recv_counts, H] in the dispatcher's dtype (the weighted sum of each
  received token's local expert rows) with the splits reversed.
Collectives 2 (2b) and 3 and the combine exchange are issued with async_op=True; *_wait waits on them.
On a group of one rank nothing is communicated (the send buffers are the receive buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.ep.base import Dispatcher, PendingCombine, SendPlan, expand_received, pack_meta, plan_sends
from moekit.ep.handle import DispatchHandle, RecvMeta
from moekit.ep.quantized import check_dispatch_scheme, quantize_tokens, received_rows, wire_rows
from moekit.ep.registry import DISPATCHERS
from moekit.quantize import QuantizedRows


@dataclass
class PendingDispatch:
    """The buffers of one dispatch in flight. FP8 (scheme set): the rows are e4m3 values as uint8 and the
    scales travel beside them."""

    works: list
    send_rows: torch.Tensor  # kept alive until the exchange is done
    send_meta: torch.Tensor
    recv_rows: torch.Tensor
    recv_meta: torch.Tensor
    send_counts: torch.Tensor  # [W] int64, CPU
    recv_counts: torch.Tensor  # [W] int64, CPU
    send_token_idx: torch.Tensor
    num_tokens: int
    scheme: str | None = None
    send_scale: torch.Tensor | None = None
    recv_scale: torch.Tensor | None = None


@DISPATCHERS.register("nccl", trains=True)
class NcclDispatcher(Dispatcher):
    """Counts first, then variable-size all-to-alls of the rows and of the packed metadata."""

    name = "nccl"
    sends_fp8 = True

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingDispatch:
        self.check_dispatch_inputs(x, topk_ids, topk_weights)
        plan = plan_sends(topk_ids, self.num_local_experts, self.world_size)
        return self._exchange(x.index_select(0, plan.send_token_idx), plan, topk_ids, topk_weights)

    def dispatch_quantized_async(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, scheme: str
    ) -> PendingDispatch:
        check_dispatch_scheme(scheme, self.name)
        self.check_dispatch_inputs(x, topk_ids, topk_weights)
        plan = plan_sends(topk_ids, self.num_local_experts, self.world_size)
        values, scale = wire_rows(quantize_tokens(x, scheme), plan.send_token_idx)
        return self._exchange(values, plan, topk_ids, topk_weights, scale, scheme)

    def _exchange(
        self,
        send_rows: torch.Tensor,
        plan: SendPlan,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        send_scale: torch.Tensor | None = None,
        scheme: str | None = None,
    ) -> PendingDispatch:
        """Start the collectives of send_rows [S, H] and their metadata (FP8: send_rows are the uint8 values,
        send_scale [S, tiles] their scales under scheme)."""
        send_meta = pack_meta(plan.send_token_idx, topk_ids, topk_weights, self.weight_dtype)
        num_tokens = topk_ids.shape[0]
        if self.world_size == 1:
            counts = plan.send_counts.cpu()
            return PendingDispatch(
                [], send_rows, send_meta, send_rows, send_meta, counts, counts, plan.send_token_idx, num_tokens,
                scheme, send_scale, send_scale,
            )  # fmt: skip
        recv_counts = torch.empty_like(plan.send_counts)
        dist.all_to_all_single(recv_counts, plan.send_counts, group=self.group)
        send_counts, recv_counts = plan.send_counts.cpu(), recv_counts.cpu()
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        num_recv = sum(recv_splits)

        works = []

        def start(send: torch.Tensor) -> torch.Tensor:
            recv = send.new_empty(num_recv, send.shape[1])
            works.append(dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=True))
            return recv

        recv_rows, recv_meta = start(send_rows), start(send_meta)
        recv_scale = None if send_scale is None else start(send_scale)
        return PendingDispatch(
            works, send_rows, send_meta, recv_rows, recv_meta, send_counts, recv_counts, plan.send_token_idx,
            num_tokens, scheme, send_scale, recv_scale,
        )  # fmt: skip

    def dispatch_wait(self, pending: PendingDispatch) -> tuple[torch.Tensor | QuantizedRows, RecvMeta, DispatchHandle]:
        for work in pending.works:
            work.wait()
        device = pending.recv_rows.device
        src_rank_of_slot = torch.repeat_interleave(
            torch.arange(self.world_size, device=device), pending.recv_counts.to(device)
        )
        expansion = expand_received(
            pending.recv_meta, src_rank_of_slot, self.expert_start, self.num_local_experts, self.weight_dtype
        )
        if pending.scheme is None:
            recv_x = pending.recv_rows.index_select(0, expansion.slot_of_row)
        else:
            recv_x = received_rows(pending.recv_rows, pending.recv_scale, expansion.slot_of_row, pending.scheme)
        num_send = pending.send_token_idx.numel()
        handle = DispatchHandle(
            send_counts=pending.send_counts,
            recv_counts=pending.recv_counts,
            send_token_idx=pending.send_token_idx,
            send_slots=torch.arange(num_send, device=device),
            recv_slot_of_row=expansion.slot_of_row,
            row_weight=expansion.meta.weight,
            num_send_slots=num_send,
            num_recv_slots=pending.recv_rows.shape[0],
            num_tokens=pending.num_tokens,
            hidden=self.hidden,
        )
        return recv_x, expansion.meta, handle

    def combine_async(
        self, expert_out: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None = None
    ) -> PendingCombine:
        self.check_combine_inputs(expert_out, handle, shared_out)
        send = self.reduce_rows(expert_out, handle)
        if self.world_size == 1:
            return PendingCombine([], send, handle, shared_out)
        back = send.new_empty(handle.num_send_slots, self.hidden)
        work = dist.all_to_all_single(
            back, send, handle.send_counts.tolist(), handle.recv_counts.tolist(), group=self.group, async_op=True
        )
        return PendingCombine([work], back, handle, shared_out, send=send)
