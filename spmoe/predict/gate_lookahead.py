"""
Gate lookahead (Mixtral-Offloading's speculative expert loading, AdapMoE's adaptive prefetch):
while the target computes layer l, its hidden state goes through the routers of layers
l+1 .. l+d, and the top experts they name are prefetched.

At layer l's experts call (`spmoe.models.experts.on_experts_call`: a seam hook, kept by piecewise CUDA
graphs), every position's hidden state (the normalized FFN input, what the router of l saw) goes
through the weights of the routers of the next `depth(l)` MoE layers, and one `PrefetchRequest`
[T, A] is submitted per predicted layer. It works with and without SD (it needs no draft). `depth`
is a fixed int or a callable of the layer (for adaptive schemes). Under `routing=replay` the guesses come from the trace (`self.replay`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spmoe.hooks import HookOwner
from spmoe.models.experts import on_experts_call
from spmoe.offload.prefetch import PrefetchProvider, PrefetchRequest
from spmoe.predict.capture import router_of


class GateLookaheadPredictor(HookOwner):
    def __init__(self, target: nn.Module, provider: PrefetchProvider, moe_layers: tuple[int, ...],
                 top_k: int, depth: int | Callable[[int], int] = 1):
        self.provider = provider
        self.top_k = top_k
        self.moe_layers = list(moe_layers)
        self.depth = depth if callable(depth) else (lambda layer, d=depth: d)
        self.step = 0
        self.replay = None  # a RouteReplay: guesses come from its trace instead of the routers
        self._weights = {layer: router_of(target, layer).weight for layer in self.moe_layers}  # [E, H]
        self._handles = [on_experts_call(target.model.layers[layer].mlp.experts,
                                         lambda h, i, w, layer=layer: self._predict(layer, h)) for layer in self.moe_layers]

    def _predict(self, layer: int, hidden: torch.Tensor) -> None:
        h = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        i = self.moe_layers.index(layer)
        for ahead in self.moe_layers[i + 1: i + 1 + self.depth(layer)]:
            if self.replay is not None:
                ids = self.replay.lookahead(layer, ahead)  # [T, A] or None
                if ids is None:
                    continue
            else:
                weight = self._weights[ahead]
                ids = nn.functional.linear(h.to(weight.dtype), weight).float().topk(self.top_k, dim=-1).indices  # [T, A]
            self.provider.submit(PrefetchRequest.from_ids(self.step, ahead, 0, ids))

    def begin_step(self, step: int) -> None:
        self.step = step

    def end_step(self) -> None:
        pass

