"""MoELayer: an nn.Module built from a MoEConfig and the names of a router, an expert backend and a
dispatcher. Router -> routed experts (locally, or dispatch -> local experts -> combine) -> + shared experts.

Weights use one layout on every path: w_gate_up [E, 2F, H] (gate rows first), w_down [E, H, F],
router_weight [E, H] (float32), shared_gate_up [S, 2Fs, H], shared_down [S, H, Fs]. With a dispatcher,
every rank holds the router and the shared experts; the routed experts a rank does not own are not read.
With quantization ("block" or "row") the routed experts are held in FP8 (moekit.quantize): e4m3 values and float32
scales as buffers, run by an FP8_EXPERT_BACKENDS backend; the router and the shared experts stay as they are.
With quantization and a dispatcher that sends FP8 rows (nccl, skip_a2a) the tokens travel in FP8 too: each is
quantized once on its rank, the receiving rank runs its experts on the e4m3 rows, and combine stays in
config.dtype (moekit.ep.ep_forward).
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.distributed as dist
from torch import nn

from moekit.config import MoEConfig
from moekit.ep import DISPATCHERS, ep_forward
from moekit.ep.base import group_size_and_rank
from moekit.ep.forward import check_fused_combine, chunk_bounds, shared_experts
from moekit.ep.local_experts import check_backend_fits, check_fp8_fits
from moekit.experts import EXPERT_BACKENDS, FP8_EXPERT_BACKENDS
from moekit.quantize import SCHEMES, QuantizedMoEWeights, QuantizedTensor, quantize_weights
from moekit.routing import ROUTERS, route
from moekit.validation import check_tensor, trusted_values
from moekit.weights import MoEWeights, init_weights, router_logits


def agree_across_ranks(group, **settings) -> None:
    """Raise ValueError on every rank of group unless every rank passes the same settings."""
    world_size, rank = group_size_and_rank(group)
    if world_size == 1:
        return
    every = [None] * world_size
    dist.all_gather_object(every, repr(settings), group=group)
    differing = [q for q, s in enumerate(every) if s != every[0]]
    if differing:
        raise ValueError(
            f"MoELayer: ranks {differing} were built with other settings than rank 0 (every rank must pass the "
            f"same): rank 0 has {every[0]}, rank {differing[0]} has {every[differing[0]]}"
        )


class MoELayer(nn.Module):
    """x [T, H] -> y [T, H] in config.dtype.

    backend: a name in EXPERT_BACKENDS (default grouped_loop), or with quantization ("block" or "row": FP8 routed
    experts quantized once here, unless weights are QuantizedMoEWeights already) in FP8_EXPERT_BACKENDS (default
    triton_grouped_fp8; with a dispatcher, one that sends FP8 rows: nccl or skip_a2a). dispatcher: None (one
    device, nothing leaves it) or a name in DISPATCHERS, set up on `group` for at most max_tokens tokens per call,
    with dispatcher_options (e.g. {"capacity": 64, "overflow": "drop"} for "symmetric"). With a dispatcher,
    shared_overlap, chunks and own_first choose the overlap, fused_combine the fused down projection
    (moekit.ep.ep_forward); every rank must build the layer with the same arguments, which the constructor
    checks (a collective over the group). check_values=False drops the
    NaN check of the router logits, the one host synchronisation of a one-device forward, so the layer can
    be captured in a CUDA graph (the router's ids reach the experts unchecked either way: they are in range);
    with a fixed-shape dispatcher (nvshmem_triton_graph, symmetric_triton_graph) and backend triton_grouped, so can the
    expert-parallel layer.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        backend: str | None = None,
        dispatcher: str | None = None,
        group=None,
        max_tokens: int = 8192,
        weights: MoEWeights | QuantizedMoEWeights | None = None,
        quantization: str | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dispatcher_options: dict | None = None,
        shared_overlap: bool = False,
        chunks: int = 1,
        own_first: bool = False,
        fused_combine: bool = False,
        check_values: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        if isinstance(weights, QuantizedMoEWeights):
            if quantization not in (None, weights.scheme):
                raise ValueError(f"quantization={quantization!r} disagrees with the weights' scheme {weights.scheme!r}")
            quantization = weights.scheme
        if quantization is not None and quantization not in SCHEMES:
            raise ValueError(f"quantization must be None or one of {SCHEMES}, got {quantization!r}")
        self.quantization = quantization
        if quantization is None:
            self.backend = EXPERT_BACKENDS.get(backend or "grouped_loop")
        else:
            self.backend = FP8_EXPERT_BACKENDS.get(backend or "triton_grouped_fp8")
        ROUTERS.get(config.router)  # an unknown router fails here, not at the first forward
        weights = weights if weights is not None else init_weights(config, seed=seed, device=device)
        if quantization is not None and not isinstance(weights, QuantizedMoEWeights):
            weights = quantize_weights(weights, quantization)  # once, at build time
        for f in fields(weights):
            value = getattr(weights, f.name)
            if isinstance(value, QuantizedTensor):  # e4m3 values and scales: buffers, like any quantized state
                self.register_buffer(f"{f.name}_values", value.values)
                self.register_buffer(f"{f.name}_scale", value.scale)
            else:
                self.register_parameter(f.name, None if value is None else nn.Parameter(value, requires_grad=False))
        self.block_size = weights.w_gate_up.block_size if quantization is not None else None
        chunk_bounds(0, chunks)  # validates chunks
        self.shared_overlap, self.chunks, self.own_first = shared_overlap, chunks, own_first
        self.fused_combine = fused_combine
        self.check_values = check_values
        self.dispatcher = None
        if fused_combine and dispatcher is None:
            raise ValueError("fused_combine fuses the combine of a dispatcher: pass dispatcher='symmetric_triton'")
        if dispatcher is not None:
            cls = DISPATCHERS.get(dispatcher).fn
            if quantization is not None:  # here, not at the first forward
                check_fp8_fits(cls, self.backend.name, own_first, fused_combine)
            else:
                check_backend_fits(cls, self.backend.name, own_first)
            if fused_combine:
                check_fused_combine(cls, self.backend.name, own_first)
            agree_across_ranks(
                group,
                config=config,
                backend=self.backend.name,
                quantization=quantization,
                dispatcher=dispatcher,
                max_tokens=max_tokens,
                dispatcher_options=dispatcher_options,
                shared_overlap=shared_overlap,
                chunks=chunks,
                own_first=own_first,
                fused_combine=fused_combine,
            )
            self.dispatcher = cls(
                group,
                config.num_experts,
                config.hidden_size,
                max_tokens,
                config.dtype,
                torch.device(device),
                **(dispatcher_options or {}),
            )
        self.group = group

    @property
    def weights(self) -> MoEWeights | QuantizedMoEWeights:
        if self.quantization is None:
            return MoEWeights(**{f.name: getattr(self, f.name) for f in fields(MoEWeights)})
        experts = {
            name: QuantizedTensor(
                getattr(self, f"{name}_values"), getattr(self, f"{name}_scale"), self.quantization, self.block_size
            )
            for name in ("w_gate_up", "w_down")
        }
        rest = {f.name: getattr(self, f.name) for f in fields(QuantizedMoEWeights) if f.name not in experts}
        return QuantizedMoEWeights(**experts, **rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, shape=(None, self.config.hidden_size), dtypes=(self.config.dtype,))
        weights = self.weights
        if self.dispatcher is not None:
            return ep_forward(
                x,
                weights,
                self.config,
                self.dispatcher,
                self.backend.name,
                self.group,
                shared_overlap=self.shared_overlap,
                chunks=self.chunks,
                own_first=self.own_first,
                fused_combine=self.fused_combine,
                check_values=self.check_values,
            )
        routing = route(
            router_logits(x, weights), self.config, weights.score_correction_bias, check_values=self.check_values
        )
        with trusted_values():
            y = self.backend.fn(x, routing.topk_ids, routing.topk_weights, weights)
        shared = shared_experts(x, weights)
        return y if shared is None else y + shared
