"""
Replaying a recorded routing trace on another model (`routing=replay`): the model's own
routers still run, but the experts every position is sent to, the verification outcome of
every step and the predictors' guesses come from the trace. So a real-shape model with random
weights moves, caches and computes exactly the experts a trained model routed to, and every
method sees the same routing.

Mapping (trace: L_t MoE layers, E_t experts, top-k A_t; replay model: L_r, E_r, A_r):
- layers: replay MoE ordinal l reads trace ordinal m(l) = floor(l * L_t / L_r) (identity when
  L_t = L_r; 32 onto 30 traced layers repeats two of them; fewer replay layers sample the trace
  evenly). Lookahead distance d from l reads trace distance clamp(m(l+d) - m(l), 1, D).
- experts: E_r = E_t and A_r = A_t are required (a clear error otherwise): inventing experts
  the trace never saw would be a guess, not a replay.
- tokens: prompts are the trace's token ids modulo the replay vocabulary; emitted tokens are
  the replay model's own (argmax at the accepted position), since only lengths matter here.
Steps: a speculative method replays the trace's rows as recorded (same k required; the last
step may draft fewer when max_new_tokens is smaller) and accepts the recorded count; a
non-speculative method decodes one token per step through the *committed* positions of each
verify row (positions 0..accepted, the tokens that entered the sequence). A trace recorded
without SD cannot drive an SD method.
Mechanism: a forward hook on each router, run before any other, replaces the router's
`(..., top_k_weights [T, A], top_k_index [T, A])` output with the trace's ids and, for format-2
traces, its weights (format 1: the replay router's own weights). Hooks registered on the router
output earlier (adaptive gating) run after it and so act on the replayed routing, with the
trained model's weights. Outputs are not meaningful text; summaries say `routing: replay`.
Graphs: a decode or verify step (T <= C = the trace's k + 1) is copied at `begin_step` into static
device buffers [C, L, A] (one host->device copy per step, ordered on the compute stream after the
previous step's kernels), and the hook returns copies of their slices: device operations only, so
with `routing.graphs` its hooks are marked graph-safe (`spmoe.hooks.mark_graph_safe`) and a CUDA graph
captured with them replays each step's routes (off: a replayed forward is never captured). Longer
forwards (prefill) take the per-step tensors as before.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from spmoe.data.prompts import Prompt
from spmoe.hooks import HookOwner, mark_graph_safe
from spmoe.models.experts import ExpertLayout
from spmoe.predict.capture import router_of
from spmoe.spec.verify import AcceptResult
from spmoe.trace.routing import RoutingTrace, TraceError


def map_layer(ordinal: int, replay_layers: int, trace_layers: int) -> int:
    return ordinal * trace_layers // replay_layers


class RouteReplay(HookOwner):
    def __init__(self, trace: RoutingTrace, layout: ExpertLayout, speculative: bool, num_draft_tokens: int,
                 graphs: bool = False):
        if trace.num_experts != layout.num_experts or trace.top_k != layout.top_k:
            raise TraceError(f"routing replay needs the trace's expert count and top-k: trace {trace.num_experts}"
                             f" experts top-{trace.top_k}, model {layout.num_experts} experts top-{layout.top_k}")
        trace_k = int(trace.meta.get("spec_k") or 0)
        if speculative and trace_k == 0:
            raise TraceError("an SD method cannot replay a trace recorded without SD (it has no verification"
                             " outcomes); record one with an SD method")
        if speculative and trace_k != num_draft_tokens:
            raise TraceError(f"the trace was recorded with spec.num_draft_tokens={trace_k}; replay with the same k"
                             f" (got {num_draft_tokens})")
        self.trace, self.layout, self.speculative, self.graphs = trace, layout, speculative, graphs
        num_layers = len(layout.moe_layers)
        self._ordinal = {layer: i for i, layer in enumerate(layout.moe_layers)}
        self._map = [map_layer(i, num_layers, trace.num_layers) for i in range(num_layers)]
        self._plans = [self._plan(p) for p in range(trace.num_prompts)]
        self._prompt, self._row = -1, None
        self._static_step = False  # the current step's routes are in the static buffers
        self._step: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the row's routes, weights [T, L, A]
        self._device_step: tuple | None = None  # the same on the model's device
        self.capacity = int(trace.meta.get("spec_k") or 0) + 1  # C: the longest decode or verify step
        self._static: tuple[torch.Tensor, torch.Tensor | None] | None = None  # routes, weights [C, L, A] on device
        self._handles: list = []

    def _plan(self, prompt: int) -> list[dict]:
        """The prompt's forwards: {positions: indices into routes, accepted, drafts: indices into predicted}."""
        pos0, draft0 = self.trace.row_starts()
        rows = self.trace.rows_of(prompt)
        plan = []
        for r in rows:
            t, k, n = int(self.trace.row_positions[r]), int(self.trace.row_drafted[r]), int(self.trace.row_accepted[r])
            positions = np.arange(pos0[r], pos0[r] + t)
            if self.speculative or n < 0:
                plan.append({"positions": positions, "accepted": max(n, 0), "drafts": np.arange(draft0[r], draft0[r] + k)})
            else:  # plain decoding walks through the committed positions one token at a time
                plan.extend({"positions": positions[j: j + 1], "accepted": 0, "drafts": positions[:0]}
                            for j in range(n + 1))
        return plan

    def prompts(self, vocab_size: int, num_prompts: int, max_new_tokens: int) -> list[Prompt]:
        if num_prompts > self.trace.num_prompts:
            raise TraceError(f"num_prompts={num_prompts} but the routing trace holds {self.trace.num_prompts} prompts")
        out = []
        for p in range(num_prompts):
            emitted = len(self.trace.generation(p))
            if max_new_tokens > emitted:
                raise TraceError(f"max_new_tokens={max_new_tokens} but the trace's prompt {p} emitted {emitted} tokens")
            out.append(Prompt(f"replay-{p}", [t % vocab_size for t in self.trace.prompt(p)]))
        return out

    def install(self, model: nn.Module) -> None:
        """Router forward hooks (run before any other; graph-safe with `graphs`) that replace each MoE
        layer's routing."""
        for layer in self.layout.moe_layers:
            def hook(m, a, out, layer=layer):
                return self._replace(layer, out)

            self._handles.append(router_of(model, layer).register_forward_hook(
                mark_graph_safe(hook) if self.graphs else hook, prepend=True))

    def _replace(self, layer: int, out: tuple) -> tuple:
        *head, weights, index = out
        t, i = index.shape[0], self._ordinal[layer]
        if self._static is None:  # allocated once, at the first routed forward: its addresses never change
            shape = (self.capacity, len(self.layout.moe_layers), self.layout.top_k)
            self._static = (torch.zeros(shape, dtype=torch.long, device=index.device), None if
                            self.trace.route_weights is None else torch.zeros(shape, device=index.device))
        if t <= self.capacity and (self._static_step or (self._row is None and self.graphs)):
            routes, step_weights = self._static  # a graph captured outside a step (its warm-up) reads them too
            if step_weights is not None:
                weights = step_weights[:t, i].to(weights.dtype)
            return (*head, weights, routes[:t, i].to(index.dtype, copy=True))
        self._current()
        if self._device_step is None or self._device_step[0].device != index.device:  # once per step
            self._device_step = tuple(None if x is None else x.to(index.device) for x in self._step)
        routes, step_weights = self._device_step
        if routes.shape[0] < t:
            raise TraceError(f"routing replay out of step: layer {layer} forwards {t} positions,"
                             f" the trace row holds {routes.shape[0]}")
        if step_weights is not None:  # [:t]: a last step may draft fewer than the trace's k
            weights = step_weights[:t, i].to(weights.dtype)
        return (*head, weights, routes[:t, i].to(index.dtype))

    def _current(self) -> dict:
        if self._row is None:
            raise TraceError("routing replay: a target forward outside an engine step")
        return self._row

    def predicted(self, layer: int, position: int) -> torch.Tensor | None:
        """The trace's draft-side prediction [1, P] for draft token `position` at `layer`, or None."""
        drafts = self._current()["drafts"]
        if position >= len(drafts):
            return None
        ids = self.trace.predicted[drafts[position], self._map[self._ordinal[layer]]]  # [P]
        if ids[0] < 0:
            return None
        return torch.from_numpy(ids.astype(np.int64))[None]

    def lookahead(self, layer: int, ahead: int) -> torch.Tensor | None:
        """The trace's gate-lookahead guess [T, A] for MoE layer `ahead`, made at `layer`."""
        i, j = self._ordinal[layer], self._ordinal[ahead]
        depth = self.trace.lookahead.shape[2]
        d = min(max(self._map[j] - self._map[i], 1), depth)
        ids = self.trace.lookahead[self._current()["positions"], self._map[i], d - 1]  # [T, A]
        if ids.size == 0 or ids[0, 0] < 0:
            return None
        return torch.from_numpy(ids.astype(np.int64))

    def accept(self, drafts: list[int], logits: torch.Tensor) -> AcceptResult:
        """The recorded number of accepted drafts; the token after them is the model's argmax there."""
        n = min(self._current()["accepted"], len(drafts))
        return AcceptResult(n, drafts[:n] + [int(logits[n].argmax())])

    def seek(self, prompt: int) -> None:
        """Make the next sequence (the next `begin_step(0)`) replay trace prompt `prompt`; sequences
        otherwise take the trace's prompts in order, one per `begin_step(0)`."""
        if not 0 <= prompt < self.trace.num_prompts:
            raise TraceError(f"routing replay: prompt {prompt}; the trace holds {self.trace.num_prompts}")
        self._prompt, self._row = prompt - 1, None

    def begin_step(self, step: int) -> None:
        if step == 0:
            self._prompt += 1
        plan = self._plans[self._prompt]
        if step >= len(plan):
            raise TraceError(f"routing replay: prompt {self._prompt} needs step {step}; the trace has {len(plan)}")
        self._row = plan[step]
        rows = self._row["positions"]
        routes = torch.from_numpy(self.trace.routes[rows][:, self._map].astype(np.int64))  # [T, L, A]
        weights = None if self.trace.route_weights is None else torch.from_numpy(
            self.trace.route_weights[rows][:, self._map].astype(np.float32))  # [T, L, A]
        self._step, self._device_step = (routes, weights), None  # gathered once per step, not per layer
        self._static_step = self._static is not None and len(rows) <= self.capacity
        if self._static_step:  # into the static buffers, in stream order after the last step's reads
            self._static[0][:len(rows)].copy_(routes)
            if weights is not None:
                self._static[1][:len(rows)].copy_(weights)

    def end_step(self) -> None:
        pass

    def summary(self) -> dict:
        meta = self.trace.meta
        return {"routing": "replay", "routing_trace_model": meta.get("model"), "routing_trace_draft": meta.get("draft"),
                "routing_trace_dataset": meta.get("dataset"), "routing_trace_layers": self.trace.num_layers}
