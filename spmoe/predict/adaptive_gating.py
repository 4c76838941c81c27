"""
Adaptive gating (AdapMoE, Zhong et al. 2024, arXiv 2408.10284): a token whose output is
insensitive to its lower-ranked experts runs with fewer experts, and those experts are never
loaded.

Mechanism: a forward hook on each MoE layer's router (`mlp.gate`, or `mlp.router` for PhiMoE)
rewrites its output `(router_logits, top_k_weights [T, A], top_k_index [T, A])`. Per token, the
routed experts are ranked by weight and normalized (w_i / sum w); the token keeps the shortest
prefix of that ranking whose normalized weight reaches `threshold` (always at least its top-1
expert). Dropped slots get index E, the "no expert" sentinel `OffloadedExperts` skips (nothing is
computed or loaded for it), and weight 0; the kept weights are rescaled so that they sum to the
token's original routed mass (1 for normalized routers such as Mixtral's: the kept top-1 gets
weight 1, as in AdapMoE). For top-2 models this is exactly "drop the second expert iff
w1 / (w1 + w2) >= threshold". A forward in which nothing is dropped is left untouched, so the
model's output is bit-identical to ungated routing whenever no token qualifies.

Gating applies only while `active`: between `begin_step` and `end_step` of the engine (decode /
verify forwards), never to the prompt's prefill. AdapMoE's code likewise gates single-token
decode forwards only; under SD every verified token is gated on its own weights.

Graphs: the router hook is device work only (no sync) and marked graph-safe; a forward being captured is
gated whatever `active` says (only decode and verify steps, which are gated, are replayed from graphs).
The counters come from a seam hook at each experts call (`spmoe.models.experts.on_experts_call`, run
by piecewise CUDA graphs on every replay) that adds the call's routes and "no expert" routes to device
counters [3] (routed, dropped, tokens gated) at a fixed address: device work only, no host sync, so it is
marked graph-safe too and a whole-step graph (a cache that holds every expert) captures it; `stats` reads
the counters once. Like the gating, it counts while active or while captured. It is attached by
`count_calls` (the runtime, once its experts modules are installed) and again at `begin_step` to any
experts module not yet counted.

Faithful: the decision is per token and per layer from the router's own probabilities, the top-1
expert is always kept, dropped experts are neither computed nor loaded, kept weights are
renormalized. Simplified: AdapMoE derives a per-layer threshold on the second expert's normalized
weight from a Fisher-information (Hessian-trace) estimate of each layer's loss sensitivity,
calibrated offline on a dataset (the repo's Mixtral thresholds, sqrt(0.005 / H_l), run from 0.01
at layer 0 to 0.49 at the last layers, median 0.14). Without gradients or task data here, one
`threshold` on the top-1 normalized weight stands for all layers; the default 0.85 (second
expert dropped when its weight is <= 0.15) is close to the median of their per-layer thresholds.
Per-layer thresholds can be passed as a dict when available.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from spmoe.hooks import HookOwner, mark_graph_safe
from spmoe.models.experts import on_experts_call
from spmoe.predict.capture import router_of
from spmoe.runtime.streams import capturing

DEFAULT_THRESHOLD = 0.85


def gate_routes(weights: torch.Tensor, index: torch.Tensor, threshold: float, num_experts: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, A], index [T, A]) -> (gated weights, gated index, keep mask [T, A]).

    Dropped slots get index `num_experts` and weight 0; kept weights keep the token's routed mass."""
    w = weights.float()
    total = w.sum(dim=-1, keepdim=True)  # [T, 1]
    order = torch.sort(w, dim=-1, descending=True, stable=True).indices  # [T, A], rank -> slot
    ranked = torch.gather(w, -1, order) / total.clamp_min(torch.finfo(torch.float32).tiny)  # [T, A]
    before = ranked.cumsum(dim=-1) - ranked  # normalized mass of the higher-ranked experts
    keep_ranked = before < threshold  # rank r kept iff ranks < r have not reached the threshold yet
    keep_ranked[:, 0] = True
    keep = torch.empty_like(keep_ranked).scatter_(-1, order, keep_ranked)  # [T, A] in slot order
    kept_mass = (w * keep).sum(dim=-1, keepdim=True)
    scale = total / kept_mass.clamp_min(torch.finfo(torch.float32).tiny)
    gated_w = torch.where(keep, w * scale, torch.zeros_like(w)).to(weights.dtype)
    gated_index = index.masked_fill(~keep, num_experts)
    return gated_w, gated_index, keep


class AdaptiveGating(HookOwner):
    """Router forward hooks that drop insensitive experts; a step listener (gates decode steps only).

    Counters (since construction or `reset`, read by `stats`): routed (token, slot) pairs seen while
    active, how many of them were dropped, and the tokens that lost at least one expert.

    NOTE: a whole-step graph captured inside a step also counts the two warm-up forwards before its capture
    (shapes precaptured before any sequence, the engine's default, are warmed up while inactive)."""

    def __init__(self, target: nn.Module, moe_layers: tuple[int, ...] | list[int], num_experts: int,
                 threshold: float | Mapping[int, float] = DEFAULT_THRESHOLD, enabled: bool = True):
        thresholds = threshold if isinstance(threshold, Mapping) else {layer: threshold for layer in moe_layers}
        bad = {layer: t for layer, t in thresholds.items() if not 0.0 < t <= 1.0}
        if bad:
            raise ValueError(f"gating thresholds must be in (0, 1] (1 = only drop experts of zero weight), got {bad}")
        self.thresholds = dict(thresholds)
        self.num_experts = num_experts
        self.enabled = enabled
        self.active = False
        self._target, self._moe_layers = target, list(moe_layers)
        device = router_of(target, self._moe_layers[0]).weight.device if self._moe_layers else torch.device("cpu")
        self._counts = torch.zeros(3, dtype=torch.long, device=device)  # [3]: routed, dropped, tokens gated
        self._counted: list[nn.Module] = []  # the experts modules whose calls are counted
        self._handles = [] if not enabled else [router_of(target, layer).register_forward_hook(
            mark_graph_safe(lambda m, a, out, layer=layer: self._gate(layer, out))) for layer in moe_layers]

    def reset(self) -> None:
        self._counts.zero_()

    def _gate(self, layer: int, out):
        """The gated router output; where nothing is dropped its values equal the router's bit for bit
        (every weight scaled by total / total = 1, the index unchanged)."""
        if not (self.active or capturing(out[-1].device)):
            return None
        *head, weights, index = out
        gated_w, gated_index, _ = gate_routes(weights, index, self.thresholds[layer], self.num_experts)
        return (*head, gated_w, gated_index)

    def _count(self, top_k_index: torch.Tensor) -> None:
        """Add one experts call's routes [T, A] to the device counters ("no expert", index E, is a dropped route)."""
        if not (self.active or (self.enabled and capturing(top_k_index.device))):
            return
        dropped = top_k_index >= self.num_experts  # [T, A]
        self._counts[:1].add_(dropped.numel())
        self._counts[1:].add_(torch.stack((dropped.sum(), dropped.any(dim=-1).sum())))  # [2]

    def count_calls(self) -> None:
        """Attach the counting seam hook to every experts module the model holds now, once each (a runtime
        calls it once its experts modules are installed, so whole-step graphs are never captured without it);
        nothing while gating is off."""
        if not self.enabled:
            return
        for layer in self._moe_layers:
            experts = self._target.model.layers[layer].mlp.experts
            if not any(experts is m for m in self._counted):
                self._counted.append(experts)
                self._handles.append(on_experts_call(experts, mark_graph_safe(lambda h, i, w: self._count(i))))

    def stats(self) -> dict:
        routed, dropped, gated = self._counts.tolist()  # the one device->host read of the counters
        return {"gating_routed": routed, "gating_dropped": dropped, "gating_tokens_gated": gated,
                "gating_drop_rate": dropped / routed if routed else None}

    # -- step listener ---------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self.active = self.enabled and step > 0  # step 0 is the prompt's prefill: never gated
        self.count_calls()

    def end_step(self) -> None:
        self.active = False

    def remove(self) -> None:
        self.active = False
        super().remove()
        self._counted.clear()
