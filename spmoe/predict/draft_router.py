"""
SP-MoE's cross-model expert predictor: the draft's hidden state at layer l, through the
target's router of layer l, predicts the experts verification will route at layer l.

While the draft proposes token j of step s (j = 0..k-1), a forward hook on each predicted layer
takes the hidden state of the draft's last input position at the capture point (see
`spmoe.predict.capture`), applies the target router's weights, and submits the top
`predict_top_k` experts (most probable first) as a `PrefetchRequest` for verify position j.
The ids reach the host by an asynchronous device->host copy into a pinned buffer followed by
an event; the draft itself never waits for the prefetch side. Layers past the cutoff L* get no
hook. The draft's forward position advances at each `after_draft_forward` (a `ModelDrafter.on_forward`
listener, through `Runtime.draft_listeners`).

CUDA graphs: the hooks are graph-safe. While a draft graph is built (`spmoe.hooks.is_building`) a hook
does only its device work: the ids go into layer i's row of a static device buffer [L, 1, A] and an
external event is recorded after them, both captured. After a replay, `after_draft_forward(True)` submits
one request per layer whose ids are copied to pinned memory on a side stream once that layer's event has
fired, so prefetching still starts layer by layer while the draft graph runs; the compute stream then
waits for those copies before anything can overwrite the buffer.

Under `routing=replay` the ids come from the trace (`self.replay`), the hooks and their timing stay.
A twinned draft (same depth and hidden size) feeds the router directly; other pairs need
`maps` ({target layer: affine W [H_d + 1, H_t]}, see `spmoe.predict.hidden_map`), which also
pick the draft layer paired with each target layer.
"""

from __future__ import annotations

import torch
from torch import nn

from spmoe.hooks import HookOwner, is_building, mark_graph_safe
from spmoe.offload.prefetch import PrefetchProvider, PrefetchRequest
from spmoe.predict.capture import CAPTURE_POINTS, router_of
from spmoe.predict.hidden_map import layer_pairs
from spmoe.runtime.streams import dedicated_stream, on_stream


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
        self._layers = list(layers)
        device = next(iter(self._weights.values())).device if layers else torch.device("cpu")
        self._static = torch.zeros(len(layers), 1, top_k, dtype=torch.long, device=device)  # [L, 1, A]
        cuda = device.type == "cuda"
        self._landed = [torch.cuda.Event(external=True) for _ in layers] if cuda else []  # row i written
        self._side = dedicated_stream(device, "predict") if cuda else None
        self._handles = []
        for i, layer in enumerate(layers):
            module = draft.model.layers[pairs[layer]]
            if capture_point == "attn_out":
                self._handles.append(module.self_attn.register_forward_hook(
                    mark_graph_safe(lambda m, a, o, i=i, layer=layer: self._hook(i, layer, o[0]))))
            elif capture_point == "residual":
                self._handles.append(module.post_attention_layernorm.register_forward_pre_hook(
                    mark_graph_safe(lambda m, a, i=i, layer=layer: self._hook(i, layer, a[0]))))
            else:
                self._handles.append(module.post_attention_layernorm.register_forward_hook(
                    mark_graph_safe(lambda m, a, o, i=i, layer=layer: self._hook(i, layer, o))))

    def _hook(self, i: int, layer: int, hidden: torch.Tensor) -> None:
        if is_building():  # a draft graph's warm-up or capture: device work only, replayed with the graph
            if self.replay is None:
                self._static[i].copy_(self._ids(layer, hidden))
            if self._landed:
                self._landed[i].record()
        elif self.active:
            self._predict(layer, hidden)

    def _ids(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The target router's top experts [1, A] (most probable first) for the hidden state's last position."""
        weight = self._weights[layer]
        h = hidden.reshape(-1, hidden.shape[-1])[-1:]  # [1, H_d]: the last input position
        if layer in self._maps:
            w = self._maps[layer]  # [H_d + 1, H_t]
            h = h.float() @ w[:-1] + w[-1]  # [1, H_t]
        logits = nn.functional.linear(h.to(weight.dtype), weight)  # [1, E]
        return logits.float().topk(self.top_k, dim=-1).indices  # [1, A]

    def _predict(self, layer: int, hidden: torch.Tensor) -> None:
        if self.replay is not None:
            self._submit_replayed(layer)
        else:
            self._submit(PrefetchRequest.from_ids(self.step, layer, self.position, self._ids(layer, hidden)))

    def _submit_replayed(self, layer: int) -> None:
        ids = self.replay.predicted(layer, self.position)
        if ids is not None:
            self._submit(PrefetchRequest.from_ids(self.step, layer, self.position, ids))

    def _submit(self, request: PrefetchRequest) -> None:
        for observe in self.observers:
            observe(request)
        self.provider.submit(request)

    def after_draft_forward(self, replayed: bool) -> None:
        """A draft forward has been launched (`ModelDrafter.on_forward`): after a graph's replay, submit every
        layer's request from the static buffer (see the module docstring); then the next position."""
        if not self.active:
            return
        if replayed:
            for i, layer in enumerate(self._layers):
                if self.replay is not None:
                    self._submit_replayed(layer)
                else:
                    self._submit(self._from_static(i, layer))
            if self._side is not None:  # no later forward overwrites the buffer before those copies
                torch.cuda.current_stream(self._static.device).wait_stream(self._side)
        self.position += 1

    def _from_static(self, i: int, layer: int) -> PrefetchRequest:
        """Layer `layer`'s request from row i of the static buffer, its ids copied once the row is written."""
        if self._side is None:
            return PrefetchRequest(self.step, layer, self.position, self._static[i].clone())
        host = torch.empty(self._static.shape[1:], dtype=torch.long, pin_memory=True)  # [1, A]
        self._side.wait_event(self._landed[i])
        with on_stream(self._side):
            host.copy_(self._static[i], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._side)
        return PrefetchRequest(self.step, layer, self.position, host, ready)

    def begin_step(self, step: int) -> None:
        self.step, self.position, self.active = step, 0, True

    def end_step(self) -> None:
        self.active = False

