"""Expert-parallel dispatch and combine: the base class and the steps every path shares.

Experts are split evenly over the ranks of a group: rank r owns global experts
[r * E_local, (r + 1) * E_local), E_local = E / W.

dispatch(x [T, H], topk_ids [T, K], topk_weights [T, K]) sends each token once to every rank that owns
at least one of its experts, with its metadata (source token index, its K expert ids, its K router
weights). The receiver expands the rows to one row per (token, local expert) pair, grouped by local
expert (stable: source rank, then source token), the layout the grouped expert backends take.

combine(expert_out [R, H], handle, shared_out) weighs each row by its router weight, sums the rows of
one (source rank, token) into one row, sends those back (one row per token per destination rank),
and the source sums what comes back per token in float32 (or wider), adds shared_out and returns
y [T, H] in the dispatcher's dtype.

dispatch_quantized(x, topk_ids, topk_weights, scheme) is dispatch with the rows sent in FP8, as DeepEP sends
them: each token quantized once on its source rank under scheme ("block": a float32 scale per 1 x 128 tile,
"row": one per row), e4m3 values and scales on the wire (moekit.ep.quantized), recv_x handed back as
QuantizedRows grouped as above; the metadata, the handle and combine are dispatch's (combine stays in the
dispatcher's dtype). A path that can (sends_fp8 = True: nccl, and skip_a2a with it) implements
dispatch_quantized_async, whose pending object its dispatch_wait takes; the others raise ValueError naming
themselves and the paths that can. A separate method rather than an argument of dispatch_async: every path
keeps its signature, and the one that quantizes says so by name.

Every rank of the group must call dispatch and combine the same number of times, in the same order,
with the same K. Argument errors are raised before any communication (so when every rank makes the
same mistake, every rank raises; a mistake on one rank alone leaves its peers waiting until the
group's timeout). One dispatch and one combine may be in flight at a time per dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.ep.handle import DispatchHandle, RecvMeta
from moekit.ep.registry import DISPATCHERS
from moekit.kernels.availability import triton_on_cuda
from moekit.quantize import QuantizedRows
from moekit.registry import Support
from moekit.validation import INDEX_DTYPES, capturing_cuda_graph, check_ids_in_range, check_tensor


def group_size_and_rank(group) -> tuple[int, int]:
    """(world size, rank) of group; (1, 0) for group None outside an initialised process group."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    if device.index is None:
        return t.device.type == device.type
    return t.device == device


@dataclass(frozen=True)
class SendPlan:
    """Who gets what from this rank: one wire row per (token, destination rank) pair.

    send_token_idx [S] int64: token of each wire row, destination-major, tokens ascending
    send_dest      [S] int64: destination rank of each wire row
    send_counts    [W] int64: wire rows per destination rank (on the tokens' device)
    """

    send_token_idx: torch.Tensor
    send_dest: torch.Tensor
    send_counts: torch.Tensor


def plan_sends(topk_ids: torch.Tensor, num_local_experts: int, world_size: int) -> SendPlan:
    """topk_ids [T, K] -> SendPlan: token t goes to rank q once if any of its experts lives on q."""
    T = topk_ids.shape[0]
    dest = topk_ids.long() // num_local_experts
    mask = torch.zeros(T, world_size, dtype=torch.bool, device=topk_ids.device)
    mask.scatter_(1, dest, True)
    send_dest, send_token_idx = torch.nonzero(mask.T, as_tuple=True)  # row-major: rank, then token
    return SendPlan(send_token_idx, send_dest, mask.sum(0, dtype=torch.int64))


def weight_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The precision router weights travel at beside rows of dtype: float64 for float64 rows (Routing's
    weights are float64 then), float32 for float32/fp16/bf16 rows."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_bits(topk_weights: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """Router weights [...] -> int64 [...]: their weight_dtype bits (float32's widened from int32), so they
    travel in the int64 metadata beside token indices and expert ids."""
    weights = topk_weights.to(weight_dtype).contiguous()
    if weight_dtype == torch.float64:
        return weights.view(torch.int64)
    return weights.view(torch.int32).long()


def weights_of_bits(bits: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """int64 [...] from weight_bits -> the router weights [...] in weight_dtype."""
    if weight_dtype == torch.float64:
        return bits.contiguous().view(torch.float64)
    return bits.to(torch.int32).view(torch.float32)


def pack_meta(
    token_idx: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weight_dtype: torch.dtype
) -> torch.Tensor:
    """Wire metadata of the tokens token_idx [S]: [S, 1 + 2K] int64 = (token index, K global expert ids,
    K router weights as weight_bits), one collective instead of three."""
    ids = topk_ids.index_select(0, token_idx).long()
    bits = weight_bits(topk_weights.index_select(0, token_idx), weight_dtype)
    return torch.cat([token_idx[:, None], ids, bits], dim=1)


def meta_padding(rows: torch.Tensor, top_k: int) -> None:
    """Fill wire metadata rows [N, 1 + 2K] as padding: token -1, ids -1 (owned by nobody), weights 0."""
    rows[:, : 1 + top_k].fill_(-1)
    rows[:, 1 + top_k :].zero_()


@dataclass(frozen=True)
class Expansion:
    """The received tokens expanded to one row per (token, local expert), grouped by local expert."""

    slot_of_row: torch.Tensor  # [R] receive-buffer slot of each row's token
    meta: RecvMeta


def expand_received(
    recv_meta: torch.Tensor,
    src_rank_of_slot: torch.Tensor,
    expert_start: int,
    num_local_experts: int,
    weight_dtype: torch.dtype,
) -> Expansion:
    """recv_meta [N, 1 + 2K] from pack_meta (padding slots have ids -1), src_rank_of_slot [N] -> Expansion.

    Pairs are listed slot-major (source rank, then source token: the order they arrive in), then sorted
    stably by local expert.
    """
    K = (recv_meta.shape[1] - 1) // 2
    local = recv_meta[:, 1 : 1 + K] - expert_start
    valid = (local >= 0) & (local < num_local_experts)
    slot, k = torch.nonzero(valid, as_tuple=True)
    experts = local[slot, k]
    order = torch.sort(experts, stable=True)[1]
    slot, k, experts = slot[order], k[order], experts[order]
    weight = weights_of_bits(recv_meta[slot, 1 + K + k], weight_dtype)
    counts = torch.bincount(experts, minlength=num_local_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    meta = RecvMeta(counts, offsets, src_rank_of_slot[slot], recv_meta[slot, 0], weight)
    return Expansion(slot, meta)


def fp8_dispatchers() -> list[str]:
    """The names of the registered dispatchers that send rows in FP8 (sends_fp8)."""
    return [impl.name for impl in DISPATCHERS if impl.fn.sends_fp8]


@dataclass
class PendingCombine:
    """A combine in flight: wait on works, then back [num_send_slots, H] holds the rows that came back.
    send: the send buffer of a path that allocates it per call, held until the exchange is done."""

    works: list
    back: torch.Tensor
    handle: DispatchHandle
    shared_out: torch.Tensor | None
    send: torch.Tensor | None = None


class Dispatcher:
    """Base of the expert-parallel paths; subclasses implement the four *_async / *_wait methods.

    group: a torch.distributed process group (None: the default group, or one rank when no process
    group is initialised); num_experts E (divisible by the group's size), hidden H, max_tokens: the
    most tokens one rank passes to dispatch (every rank of the group must use the same value); dtype:
    of x and of the rows on the wire; device: where x lives. Router weights travel at weight_dtype
    (weight_dtype_for(dtype)): RecvMeta.weight and the handle's row_weight are in it.
    """

    name = "dispatcher"
    # what one row on the wire is: "token" = one per (token, destination rank), "pair" = one per (token, expert)
    rows_on_the_wire = "token"
    # True: dispatch returns a fixed number of rows (a bound; rows from local_expert_offsets[-1] on are padding)
    # and nothing waits for the host, so a layer on it can be captured in a CUDA graph
    fixed_shapes = False
    handle_type = DispatchHandle  # what dispatch returns and combine takes
    # True: combine_down_async(hidden, w_down, meta, handle, shared_out) runs the experts' down projection and
    # stores its rows straight where combine sends them (ep_forward's fused_combine)
    fuses_down_projection = False
    # True: dispatch_quantized_async sends the rows in FP8 (e4m3 values + float32 scales)
    sends_fp8 = False

    def __init__(
        self,
        group,
        num_experts: int,
        hidden: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        _require_int("num_experts", num_experts, 1)
        _require_int("hidden", hidden, 1)
        _require_int("max_tokens", max_tokens, 0)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        world_size, rank = self.group_size_and_rank(group)
        ok, reason = self.supported_here(world_size, torch.device(device), dtype)
        if not ok:
            raise ValueError(
                f"dispatcher {self.name!r} cannot run on {world_size} {torch.device(device).type} ranks: {reason}"
            )
        if num_experts % world_size:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the world size ({world_size}): "
                "experts are split evenly over the ranks"
            )
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.num_experts = num_experts
        self.num_local_experts = num_experts // world_size
        self.expert_start = rank * self.num_local_experts
        self.hidden = hidden
        self.max_tokens = max_tokens
        self.dtype = dtype
        self.device = torch.device(device)
        self.accumulate_dtype = torch.promote_types(dtype, torch.float32)
        self.weight_dtype = weight_dtype_for(dtype)
        # the combine's sums as Triton kernels on CUDA (float32 accumulation); torch ops elsewhere
        self._sums_in_triton = triton_on_cuda(self.device, dtype)

    @classmethod
    def supports(cls, world_size: int, device_type: str) -> Support:
        """(ok, reason): whether this path runs on a group of world_size ranks on device_type ("cpu", "cuda")."""
        return True, ""

    def supported_here(self, world_size: int, device: torch.device, dtype: torch.dtype) -> Support:
        """(ok, reason) for this instance: supports() by default; a path may know more (its dtype, its heap)."""
        return self.supports(world_size, device.type)

    def group_size_and_rank(self, group) -> tuple[int, int]:
        """(world size, rank) of the group this dispatcher serves."""
        return group_size_and_rank(group)

    @property
    def local_experts(self) -> range:
        """The global ids of the experts this rank owns."""
        return range(self.expert_start, self.expert_start + self.num_local_experts)

    # ---- checks, before any communication -------------------------------------------------------

    def check_dispatch_inputs(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        check_tensor("x", x, shape=(None, self.hidden), floating=True)
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the dispatcher's dtype {self.dtype}, got {x.dtype}")
        if not _on_device(x, self.device):
            raise ValueError(f"x must be on the dispatcher's device {self.device}, got {x.device}")
        T = x.shape[0]
        if T > self.max_tokens:
            raise ValueError(
                f"x has {T} tokens, above max_tokens={self.max_tokens} this {self.name!r} dispatcher was set up for"
            )
        check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
        if topk_ids.shape[0] != T:
            raise ValueError(f"topk_ids must have {T} rows (one per token of x), got shape {tuple(topk_ids.shape)}")
        if not 1 <= topk_ids.shape[1] <= self.num_experts:
            raise ValueError(f"topk_ids must have 1 to {self.num_experts} columns, got {topk_ids.shape[1]}")
        check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), floating=True)
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if t.device != x.device:
                raise ValueError(f"{name} must be on {x.device} with x, got {t.device}")
        if not capturing_cuda_graph(topk_ids):  # the range check waits for the device; a capture cannot
            check_ids_in_range("topk_ids", topk_ids, self.num_experts)

    def check_combine_inputs(self, expert_out: torch.Tensor | None, handle, shared_out: torch.Tensor | None) -> None:
        """expert_out None: a fused combine that computes it (its caller checks its own inputs)."""
        if not isinstance(handle, self.handle_type):
            raise TypeError(f"handle must be a {self.handle_type.__name__}, got {type(handle).__name__}")
        if expert_out is not None:
            self._check_expert_out(expert_out, handle)
        if shared_out is not None:
            check_tensor("shared_out", shared_out, shape=(handle.num_tokens, self.hidden), floating=True)
            if not _on_device(shared_out, self.device):
                raise ValueError(f"shared_out must be on {self.device}, got {shared_out.device}")

    def _check_expert_out(self, expert_out: torch.Tensor, handle) -> None:
        check_tensor("expert_out", expert_out, shape=(handle.num_rows, self.hidden), floating=True)
        if not _on_device(expert_out, self.device):
            raise ValueError(f"expert_out must be on the dispatcher's device {self.device}, got {expert_out.device}")

    def check_top_k_unchanged(self, top_k: int, set_up_for: int | None) -> None:
        """A path whose symmetric buffers were sized, collectively, for the top_k of its first call (set_up_for;
        None before it) refuses another: the peers' buffers cannot be reallocated by one rank."""
        if set_up_for is not None and top_k != set_up_for:
            raise ValueError(
                f"topk_ids has {top_k} columns; this {self.name} dispatcher was set up for top_k={set_up_for} "
                "on its first call (its buffers are symmetric): make another for another top_k"
            )

    # ---- the shared halves of combine ------------------------------------------------------------

    def reduce_rows(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """expert_out [R, H] -> [num_recv_slots, H] in the dispatcher's dtype: the weighted rows of each
        received token summed (in accumulate_dtype) into its slot; slots without rows are zero. On CUDA one
        Triton pass (moekit.kernels.slot_sums)."""
        if self._sums_in_triton:
            from moekit.kernels.slot_sums import sum_into_slots

            return sum_into_slots(
                expert_out, handle.recv_slot_of_row, handle.num_recv_slots, self.dtype,
                weight_of_entry=handle.row_weight,
            )  # fmt: skip
        acc = torch.zeros(handle.num_recv_slots, self.hidden, dtype=self.accumulate_dtype, device=expert_out.device)
        weighted = expert_out.to(self.accumulate_dtype) * handle.row_weight.to(self.accumulate_dtype)[:, None]
        return acc.index_add_(0, handle.recv_slot_of_row, weighted).to(self.dtype)

    def gather_back(self, back: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None) -> torch.Tensor:
        """back [num_send_slots, H] (what came back) -> y [T, H] in the dispatcher's dtype."""
        if self._sums_in_triton:
            from moekit.kernels.slot_sums import sum_into_slots

            return sum_into_slots(
                back, handle.send_token_idx, handle.num_tokens, self.dtype, row_of_entry=handle.send_slots,
                add=shared_out,
            )  # fmt: skip
        y = torch.zeros(handle.num_tokens, self.hidden, dtype=self.accumulate_dtype, device=back.device)
        y.index_add_(0, handle.send_token_idx, back.index_select(0, handle.send_slots).to(self.accumulate_dtype))
        if shared_out is not None:
            y += shared_out.to(self.accumulate_dtype)
        return y.to(self.dtype)

    # ---- the interface -----------------------------------------------------------------------------

    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, RecvMeta, DispatchHandle]:
        """x [T, H], topk_ids [T, K], topk_weights [T, K] -> (recv_x [R, H], RecvMeta, DispatchHandle)."""
        return self.dispatch_wait(self.dispatch_async(x, topk_ids, topk_weights))

    def combine(
        self, expert_out: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """expert_out [R, H] (unweighted expert outputs, rows as dispatch returned them) -> y [T, H]."""
        return self.combine_wait(self.combine_async(expert_out, handle, shared_out))

    def dispatch_quantized(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, scheme: str
    ) -> tuple[QuantizedRows, RecvMeta, DispatchHandle]:
        """x [T, H], topk_ids [T, K], topk_weights [T, K], scheme ("block" or "row") -> (recv_x QuantizedRows
        [R, H], RecvMeta, DispatchHandle): dispatch with the rows in FP8; combine takes expert_out [R, H] in
        the dispatcher's dtype as after dispatch."""
        return self.dispatch_wait(self.dispatch_quantized_async(x, topk_ids, topk_weights, scheme))

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """Check, plan and start the exchange; returns a pending object for dispatch_wait."""
        raise NotImplementedError

    def dispatch_quantized_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, scheme):
        """dispatch_async with the rows quantized under scheme; its dispatch_wait returns QuantizedRows. Paths
        without sends_fp8 raise ValueError here, before any communication."""
        raise ValueError(f"dispatcher {self.name!r} cannot send FP8 rows; the ones that can: {fp8_dispatchers()}")

    def dispatch_wait(self, pending) -> tuple[torch.Tensor, RecvMeta, DispatchHandle]:
        raise NotImplementedError

    def combine_async(self, expert_out: torch.Tensor, handle: DispatchHandle, shared_out: torch.Tensor | None = None):
        """Start sending the rows back. shared_out is first read by combine_wait (in stream order on GPUs),
        so the caller may still be filling it in between: its compute then runs while the rows travel."""
        raise NotImplementedError

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        """Wait for the rows to come back; sum them per token (+ shared_out) -> y [T, H]."""
        for work in pending.works:
            work.wait()
        return self.gather_back(pending.back, pending.handle, pending.shared_out)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, rank={self.rank}/{self.world_size}, "
            f"num_experts={self.num_experts}, hidden={self.hidden}, max_tokens={self.max_tokens}, dtype={self.dtype})"
        )
