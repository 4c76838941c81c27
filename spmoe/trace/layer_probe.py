"""
A probe of a model's decoder-layer outputs, forward by forward, for comparing two runtimes' numerics
on identical inputs (`experiments.diag_lossless`).

Terms: a *forward* is one call of the whole model (a prefill or one decode step); the probe's
`forwards[f][i]` is decoder layer i's output hidden state [T, H] in forward f, copied to the host
in the model's dtype (exact: no rounding is added by the copy). With `parts=True` the probe also
keeps `parts[f][i]`, a `LayerParts` of layer i in forward f: the attention block's output, the
experts module's inputs (hidden states, routes, route weights) and output, and the MLP block's
output (`layer.mlp`: for an MoE layer the sparse-MoE block, shared experts included) as `moe_out`,
each copied the same way. A *part* is one of these tensors.
Invariants: a forward calls every decoder layer once, in order, so layer 0's call opens a new
forward; `parts[f]` and `forwards[f]` have one entry per layer; the hooks only read (they return
None), so the probed computation is unchanged. The hooks are torch forward hooks, which CUDA graphs
cannot keep (`spmoe.runtime.graphs.graph_safe`): close the probe before a graphed step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn


@dataclass
class LayerParts:
    """One decoder layer's parts in one forward (host copies, their own dtypes); None where the layer
    has no such module (a dense layer has no experts) or it was not called. Fields are in the order a
    Mixtral-style layer computes them: attn = self_attn(norm(x)); experts_in = norm(x + attn), which
    the router reads too; the router's routes and weights; experts_out; moe_out = the block's output
    (with shared experts, where the family has them); the layer's output = x + attn + moe_out.
    T = tokens, H = hidden, A = experts per token."""

    attn: torch.Tensor | None = None  # [T, H] the attention block's output (before the residual add)
    experts_in: torch.Tensor | None = None  # [T, H] the experts' (and the router's) input
    routes: torch.Tensor | None = None  # [T, A] the routed expert ids (top_k_index)
    weights: torch.Tensor | None = None  # [T, A] the routes' weights (top_k_weights)
    experts_out: torch.Tensor | None = None  # [T, H] the experts' weighted sum
    moe_out: torch.Tensor | None = None  # [T, H] the MLP block's output (before the residual add)


PART_ORDER = tuple(f.name for f in fields(LayerParts))  # the order a layer computes its parts in


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (`model.model.layers`)."""
    return list(model.model.layers)


def part_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """A decoder layer's probed submodules, those it has of: `attn` (`self_attn`), `mlp` (`mlp`) and
    `experts` (`mlp.experts`, the fused experts module that transformers calls as
    `experts(hidden_states [T, H], top_k_index [T, A], top_k_weights [T, A])`, e.g. `OffloadedExperts`)."""
    found = {"attn": getattr(layer, "self_attn", None), "mlp": getattr(layer, "mlp", None)}
    experts = getattr(found["mlp"], "experts", None)
    found["experts"] = None if isinstance(experts, nn.ModuleList) else experts  # a ModuleList is not called
    return {name: m for name, m in found.items() if m is not None}


def _host(t: torch.Tensor) -> torch.Tensor:
    """An exact host copy (same dtype), flattened to [T, last dim]: a batch of one gives [1, T, X] or [T, X]."""
    t = t.detach()
    return t.reshape(-1, t.shape[-1]).to("cpu", copy=True)


class LayerProbe:
    """Forward hooks on every decoder layer recording its output, as a context manager.

    Args:
        model: a transformers causal LM (the runtime's `model`).
        max_forwards: stop recording after this many forwards (None: every forward while open).
        parts: also record each layer's parts (`LayerParts`) in `parts`; off: `parts` stays empty.

    Example:
        with LayerProbe(runtime.model, parts=True) as probe:
            decoder.forward(prompt_ids, 1)
        probe.forwards[0][3]  # layer 3's output over the prompt, [T, H] on the host
        probe.parts[0][3].routes  # layer 3's routed expert ids, [T, A] on the host
    """

    def __init__(self, model: nn.Module, max_forwards: int | None = None, parts: bool = False):
        self.layers = decoder_layers(model)
        self.max_forwards = max_forwards
        self.record_parts = parts
        self.forwards: list[list[torch.Tensor]] = []
        self.parts: list[list[LayerParts]] = []
        self._handles: list = []
        self._recording = False
        self._pending = LayerParts()  # the parts of the layer running now

    def __enter__(self) -> "LayerProbe":
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._open(i)))
            self._handles.append(layer.register_forward_hook(self._hook(i)))
            if not self.record_parts:
                continue
            modules = part_modules(layer)
            if "attn" in modules:
                self._handles.append(modules["attn"].register_forward_hook(self._store("attn")))
            if "mlp" in modules:
                self._handles.append(modules["mlp"].register_forward_hook(self._store("moe_out")))
            if "experts" in modules:
                self._handles.append(modules["experts"].register_forward_pre_hook(self._experts_in, with_kwargs=True))
                self._handles.append(modules["experts"].register_forward_hook(self._store("experts_out")))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _open(self, layer_idx: int):
        def pre_hook(module: nn.Module, args) -> None:
            if layer_idx == 0:
                self._recording = self.max_forwards is None or len(self.forwards) < self.max_forwards
                if self._recording:
                    self.forwards.append([])
                    if self.record_parts:
                        self.parts.append([])
            self._pending = LayerParts()
        return pre_hook

    def _hook(self, layer_idx: int):
        def hook(module: nn.Module, args, output) -> None:
            if not self._recording:
                return
            hidden = output[0] if isinstance(output, tuple) else output  # [1, T, H]
            self.forwards[-1].append(hidden[0].detach().to("cpu", copy=True))  # [T, H]
            if self.record_parts:
                self.parts[-1].append(self._pending)
            self._pending = LayerParts()
        return hook

    def _store(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if self._recording:
                out = output[0] if isinstance(output, tuple) else output  # [1, T, H] or [T, H]
                setattr(self._pending, name, _host(out))  # [T, H]
        return hook

    def _experts_in(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording:
            return
        hidden, index, weights = [*args, *kwargs.values()][:3]  # [T, H], [T, A], [T, A]
        parts = self._pending
        parts.experts_in, parts.routes, parts.weights = _host(hidden), _host(index), _host(weights)


def layer_diffs(method: list[torch.Tensor], reference: list[torch.Tensor]) -> list[dict]:
    """Per layer of one forward (outputs [T, H] each, same shapes): the max |difference| over all
    positions and at the last one, and the reference's max |value| (the scale), all in float32."""
    rows = []
    for i, (a, b) in enumerate(zip(method, reference)):
        diff = (a.float() - b.float()).abs()  # [T, H]
        rows.append({"layer": i, "max_abs_diff": float(diff.max()), "last_pos_max_abs_diff": float(diff[-1].max()),
                     "num_diff_elements": int((diff > 0).sum()), "ref_max_abs": float(b.float().abs().max())})
    return rows


def first_differing_layer(rows: list[dict]) -> int | None:
    """The first layer of `layer_diffs` rows whose output differs anywhere, or None."""
    return next((r["layer"] for r in rows if r["max_abs_diff"] != 0), None)  # NaN differs too


def first_differing_part(method: LayerParts, reference: LayerParts) -> tuple[str, float] | None:
    """The first part (in `PART_ORDER`) that differs between two runs of one layer, and its max
    |difference| in float32 (routes: of the ids), or None when every part recorded by both is identical.
    `weights` are compared only where the routes are identical; a shape mismatch counts as a difference
    (max |difference| inf)."""
    for name in PART_ORDER:
        a, b = getattr(method, name), getattr(reference, name)
        if a is None or b is None:
            continue
        if a.shape != b.shape:
            return name, float("inf")
        diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0  # NaN propagates
        if diff != 0:  # NaN differs too
            return name, diff
    return None
