"""MoELayer: an nn.Module built from a MoEConfig and the names of a router, an expert backend and a
dispatcher. Router -> routed experts (locally, or dispatch -> local experts -> combine) -> + shared experts.

Weights use one layout on every path: w_gate_up [E, 2F, H] (gate rows first), w_down [E, H, F],
router_weight [E, H] (float32), shared_gate_up [S, 2Fs, H], shared_down [S, H, Fs]. With a dispatcher,
every rank holds the router and the shared experts; the routed experts a rank does not own are not read.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.dist import DISPATCHERS, ep_forward
from moekit.dist.forward import shared_experts
from moekit.experts import EXPERT_BACKENDS
from moekit.routing import ROUTERS, route
from moekit.validation import check_tensor
from moekit.weights import MoEWeights, init_weights, router_logits


class MoELayer(nn.Module):
    """x [T, H] -> y [T, H] in config.dtype.

    backend: a name in EXPERT_BACKENDS. dispatcher: None (one device, nothing leaves it) or a name in
    DISPATCHERS, set up on `group` for at most max_tokens tokens per call.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        backend: str = "grouped_loop",
        dispatcher: str | None = None,
        group=None,
        max_tokens: int = 8192,
        weights: MoEWeights | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        self.backend = EXPERT_BACKENDS.get(backend)
        ROUTERS.get(config.router)  # an unknown router fails here, not at the first forward
        weights = weights if weights is not None else init_weights(config, seed=seed, device=device)
        for f in fields(MoEWeights):
            tensor = getattr(weights, f.name)
            self.register_parameter(f.name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))
        self.dispatcher = None
        if dispatcher is not None:
            cls = DISPATCHERS.get(dispatcher).fn
            self.dispatcher = cls(
                group, config.num_experts, config.hidden_size, max_tokens, config.dtype, torch.device(device)
            )
        self.group = group

    @property
    def weights(self) -> MoEWeights:
        return MoEWeights(**{f.name: getattr(self, f.name) for f in fields(MoEWeights)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, shape=(None, self.config.hidden_size), dtypes=(self.config.dtype,))
        weights = self.weights
        if self.dispatcher is not None:
            return ep_forward(x, weights, self.config, self.dispatcher, self.backend.name, self.group)
        routing = route(router_logits(x, weights), self.config, weights.score_correction_bias)
        y = self.backend.fn(x, routing.topk_ids, routing.topk_weights, weights)
        shared = shared_experts(x, weights)
        return y if shared is None else y + shared
