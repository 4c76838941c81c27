"""
Recording a run's routing (`trace.routing=true`) into a `RoutingTrace` (see
`spmoe.trace.routing` for the format).

Hooks, installed after the method's runtime is built and removed by its closer:
- a forward pre-hook on every MoE layer's experts module keeps the `top_k_index [T, A]` and
  weights the experts are called with (after adaptive gating and after a replay, so a recording of a replay
  records what was replayed);
- a forward pre-hook on every router applies the routers of the next `lookahead_depth` MoE layers
  to its input (gate lookahead, method-independent);
- an observer on each draft-side predictor keeps its `PrefetchRequest`s; their ids are read at
  the end of the step, after the request's ready event, so the draft never waits for the recorder.
A row starts at every `begin_step`; `to_trace` pairs rows with the engine's step records in
order (one target forward per record) and fails loudly if they do not line up.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from spmoe.hooks import HookOwner
from spmoe.models.experts import ExpertLayout
from spmoe.offload.prefetch import PrefetchRequest
from spmoe.predict.capture import router_of
from spmoe.trace.routing import FORMAT_VERSION, RoutingTrace, TraceError


class RoutingRecorder(HookOwner):
    def __init__(self, model: nn.Module, layout: ExpertLayout, lookahead_depth: int = 3):
        self.layout = layout
        self.depth = lookahead_depth
        self.rows: list[dict] = []
        self.predict_top_k: int | None = None
        layers = list(layout.moe_layers)
        self._ordinal = {layer: i for i, layer in enumerate(layers)}
        self._weights = [router_of(model, layer).weight for layer in layers]  # [E, H] each
        self._handles = []
        for layer in layers:
            self._handles.append(model.model.layers[layer].mlp.experts.register_forward_pre_hook(
                lambda m, a, layer=layer: self._route(layer, a[1], a[2])))
            self._handles.append(router_of(model, layer).register_forward_pre_hook(
                lambda m, a, layer=layer: self._lookahead(layer, a[0])))

    def _row(self) -> dict:
        if not self.rows:
            raise TraceError("routing recorder: a target forward outside an engine step")
        return self.rows[-1]

    def _route(self, layer: int, index: torch.Tensor, weights: torch.Tensor) -> None:
        row, i = self._row(), self._ordinal[layer]
        row["routes"][i] = index.detach().to("cpu", torch.int16)
        row["weights"][i] = weights.detach().to("cpu", torch.float32)

    @torch.no_grad()
    def _lookahead(self, layer: int, hidden: torch.Tensor) -> None:
        i = self._ordinal[layer]
        h = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        out = torch.full((h.shape[0], self.depth, self.layout.top_k), -1, dtype=torch.int16)  # [T, D, A]
        for d, w in enumerate(self._weights[i + 1: i + 1 + self.depth]):
            ids = nn.functional.linear(h.to(w.dtype), w).float().topk(self.layout.top_k, dim=-1).indices  # [T, A]
            out[:, d] = ids.to("cpu", torch.int16)
        self._row()["lookahead"][i] = out

    def observe(self, request: PrefetchRequest) -> None:
        """Observer of a draft-side predictor: one request = one draft token's prediction at one layer."""
        self._row()["predicted"].append(request)

    def begin_step(self, step: int) -> None:
        self.rows.append({"routes": {}, "weights": {}, "lookahead": {}, "predicted": []})

    def end_step(self) -> None:
        row = self.rows[-1]
        preds = {}
        for req in row["predicted"]:
            if req.ready is not None:
                req.ready.synchronize()
            ids = req.expert_ids.reshape(-1)  # [P]
            self.predict_top_k = self.predict_top_k or len(ids)
            preds[(self._ordinal[req.layer], req.position)] = ids.to(torch.int16)
        row["predicted"] = preds


    def to_trace(self, prompts: list[list[int]], gens: list, meta: dict) -> RoutingTrace:
        """Pair the recorded rows with the generations' step records (same order) into a trace."""
        records = [r for g in gens for r in g.records]
        if len(records) != len(self.rows):
            raise TraceError(f"routing recorder saw {len(self.rows)} target forwards for {len(records)} step records")
        num_layers, top_k = len(self.layout.moe_layers), self.layout.top_k
        p = self.predict_top_k or top_k
        routes, weights, look, predicted = [], [], [], []
        for rec, row in zip(records, self.rows):
            if len(row["routes"]) != num_layers:
                raise TraceError(f"step {rec.step} of prompt {rec.prompt_idx}: routes of {len(row['routes'])}"
                                 f" of {num_layers} MoE layers recorded")
            routes.append(torch.stack([row["routes"][i] for i in range(num_layers)], dim=1))  # [T, L, A]
            weights.append(torch.stack([row["weights"][i] for i in range(num_layers)], dim=1))  # [T, L, A]
            t = routes[-1].shape[0]
            empty = torch.full((t, self.depth, top_k), -1, dtype=torch.int16)
            look.append(torch.stack([row["lookahead"].get(i, empty) for i in range(num_layers)], dim=1))  # [T, L, D, A]
            k = rec.num_drafted or 0
            pred = torch.full((k, num_layers, p), -1, dtype=torch.int16)  # [k, L, P]
            for (layer, pos), ids in row["predicted"].items():
                if pos < k:
                    pred[pos, layer, : len(ids)] = ids[:p]
            predicted.append(pred)
        gen_tokens = [g.token_ids for g in gens]
        meta = {**meta, "format_version": FORMAT_VERSION, "moe_layers": list(self.layout.moe_layers),
                "num_experts": self.layout.num_experts, "top_k": top_k, "predict_top_k": p,
                "lookahead_depth": self.depth}
        trace = RoutingTrace(
            meta=meta,
            prompt_offsets=np.cumsum([0] + [len(x) for x in prompts[: len(gens)]]).astype(np.int64),
            prompt_tokens=np.array([t for x in prompts[: len(gens)] for t in x], dtype=np.int32),
            gen_offsets=np.cumsum([0] + [len(x) for x in gen_tokens]).astype(np.int64),
            gen_tokens=np.array([t for x in gen_tokens for t in x], dtype=np.int32),
            row_prompt=np.array([r.prompt_idx for r in records], dtype=np.int32),
            row_step=np.array([r.step for r in records], dtype=np.int32),
            row_positions=np.array([x.shape[0] for x in routes], dtype=np.int32),
            row_drafted=np.array([r.num_drafted or 0 for r in records], dtype=np.int16),
            row_accepted=np.array([-1 if r.phase == "prefill" else (r.num_accepted or 0) for r in records],
                                  dtype=np.int16),
            routes=torch.cat(routes).numpy(),
            predicted=torch.cat(predicted).numpy() if predicted else np.zeros((0, num_layers, p), np.int16),
            lookahead=torch.cat(look).numpy(),
            route_weights=torch.cat(weights).numpy(),
        )
        trace.validate()
        return trace
