"""
SP-MoE's cross-model expert predictor: the draft's hidden state at layer l, through the
target's router of layer l, predicts the experts verification will route at layer l.

While the draft proposes token j of step s (j = 0..k-1), a forward hook on each predicted layer
takes the hidden state of the draft's last input position at the capture point (see
`spmoe.predict.capture`), applies the target router's weights, and submits the top
`predict_top_k` experts (most probable first) as a `PrefetchRequest` for verify position j.
The ids reach the host by an asynchronous device->host copy into a pinned buffer followed by
an event; the draft itself never waits for the prefetch side. Layers past the cutoff L* get no
hook. Under `routing=replay` the ids come from the trace (`self.replay`), the hooks and their
timing stay. A twinned draft (same depth and hidden size) feeds the router directly; other pairs need
`maps` ({target layer: affine W [H_d + 1, H_t]}, see `spmoe.predict.hidden_map`), which also
pick the draft layer paired with each target layer.
"""

from __future__ import annotations

import torch
from torch import nn

from spmoe.hooks import HookOwner
from spmoe.offload.prefetch import PrefetchProvider, PrefetchRequest
from spmoe.predict.capture import CAPTURE_POINTS, router_of
from spmoe.predict.hidden_map import layer_pairs


def is_twin(draft: nn.Module, target: nn.Module) -> bool:
    return (draft.config.hidden_size == target.config.hidden_size
            and len(draft.model.layers) == len(target.model.layers))


class DraftRouterPredictor(HookOwner):
    def __init__(self, draft: nn.Module, target: nn.Module, provider: PrefetchProvider, layers: list[int],
                 capture_point: str, top_k: int, maps: dict[int, torch.Tensor] | None = None):
        if capture_point not in CAPTURE_POINTS:
            raise ValueError(f"unknown capture point {capture_point!r}; valid: {list(CAPTURE_POINTS)}")
        if maps is None and not is_twin(draft, target):
            raise ValueError(
                f"the draft->target-router predictor needs a twinned draft or learned maps: draft hidden"
                f" {draft.config.hidden_size} x {len(draft.model.layers)} layers vs target"
                f" {target.config.hidden_size} x {len(target.model.layers)}")
        pairs = layer_pairs(len(draft.model.layers), len(target.model.layers), layers) if maps else {l: l for l in layers}
        self._maps = {layer: maps[layer].to(router_of(target, layer).weight.device) for layer in layers} if maps else {}
        self.provider = provider
        self.top_k = top_k
        self.active = False
        self.replay = None  # a RouteReplay: predictions come from its trace instead of the router
        self.observers: list = []  # called with every PrefetchRequest submitted (routing recorder)
        self.step = 0
        self.position = 0
        self._weights = {layer: router_of(target, layer).weight for layer in layers}  # [E, H]
        self._handles = [draft.register_forward_hook(self._after_draft_forward)]
        for layer in layers:
            module = draft.model.layers[pairs[layer]]
            if capture_point == "attn_out":
                self._handles.append(module.self_attn.register_forward_hook(
                    lambda m, a, o, layer=layer: self._predict(layer, o[0])))
            elif capture_point == "residual":
                self._handles.append(module.post_attention_layernorm.register_forward_pre_hook(
                    lambda m, a, layer=layer: self._predict(layer, a[0])))
            else:
                self._handles.append(module.post_attention_layernorm.register_forward_hook(
                    lambda m, a, o, layer=layer: self._predict(layer, o)))

    def _predict(self, layer: int, hidden: torch.Tensor) -> None:
        if not self.active:
            return
        if self.replay is not None:
            ids = self.replay.predicted(layer, self.position)
            if ids is not None:
                self._submit(PrefetchRequest.from_ids(self.step, layer, self.position, ids))
            return
        weight = self._weights[layer]
        h = hidden.reshape(-1, hidden.shape[-1])[-1:]  # [1, H_d]: the last input position
        if layer in self._maps:
            w = self._maps[layer]  # [H_d + 1, H_t]
            h = h.float() @ w[:-1] + w[-1]  # [1, H_t]
        logits = nn.functional.linear(h.to(weight.dtype), weight)  # [1, E]
        ids = logits.float().topk(self.top_k, dim=-1).indices  # [1, A], most probable first
        self._submit(PrefetchRequest.from_ids(self.step, layer, self.position, ids))

    def _submit(self, request: PrefetchRequest) -> None:
        for observe in self.observers:
            observe(request)
        self.provider.submit(request)

    def _after_draft_forward(self, module, args, output) -> None:
        if self.active:
            self.position += 1

    def begin_step(self, step: int) -> None:
        self.step, self.position, self.active = step, 0, True

    def end_step(self) -> None:
        self.active = False

