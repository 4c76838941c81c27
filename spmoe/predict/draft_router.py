"""
SP-MoE's cross-model expert predictor: the draft's hidden state at layer l, through the
target's router of layer l, predicts the experts verification will route at layer l.

While the draft proposes token j of step s (j = 0..k-1), a forward hook on each predicted layer
takes the hidden state of the draft's last input position at the capture point (see
`spmoe.predict.capture`), applies the target router's weights, and submits the top
`predict_top_k` experts (most probable first) as a `PrefetchRequest` for verify position j.
The ids reach the host by an asynchronous device->host copy into a pinned buffer followed by
an event; the draft itself never waits for the prefetch side. Layers past the cutoff L* get no
hook. Requires a structurally twinned draft (same depth and hidden size as the target).
"""

from __future__ import annotations

import torch
from torch import nn

from spmoe.offload.prefetch import PrefetchProvider, PrefetchRequest
from spmoe.predict.capture import CAPTURE_POINTS, router_of


class DraftRouterPredictor:
    def __init__(self, draft: nn.Module, target: nn.Module, provider: PrefetchProvider, layers: list[int],
                 capture_point: str, top_k: int):
        if capture_point not in CAPTURE_POINTS:
            raise ValueError(f"unknown capture point {capture_point!r}; valid: {list(CAPTURE_POINTS)}")
        if draft.config.hidden_size != target.config.hidden_size or len(draft.model.layers) < max(layers, default=0) + 1:
            raise ValueError(
                f"the draft->target-router predictor needs a twinned draft: draft hidden {draft.config.hidden_size}"
                f" x {len(draft.model.layers)} layers vs target {target.config.hidden_size} x {len(target.model.layers)}")
        self.provider = provider
        self.top_k = top_k
        self.active = False
        self.step = 0
        self.position = 0
        self._weights = {layer: router_of(target, layer).weight for layer in layers}  # [E, H]
        self._handles = [draft.register_forward_hook(self._after_draft_forward)]
        for layer in layers:
            module = draft.model.layers[layer]
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
        weight = self._weights[layer]
        h = hidden.reshape(-1, hidden.shape[-1])[-1:]  # [1, H]: the last input position
        logits = nn.functional.linear(h.to(weight.dtype), weight)  # [1, E]
        ids = logits.float().topk(self.top_k, dim=-1).indices[0]  # [A], most probable first
        ready = None
        if ids.is_cuda:
            host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host.copy_(ids, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = ids.clone()
        self.provider.submit(PrefetchRequest(self.step, layer, self.position, host, ready))

    def _after_draft_forward(self, module, args, output) -> None:
        if self.active:
            self.position += 1

    def begin_step(self, step: int) -> None:
        self.step, self.position, self.active = step, 0, True

    def end_step(self) -> None:
        self.active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
