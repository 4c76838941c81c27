"""
A probe of a model's decoder-layer outputs, forward by forward, for comparing two runtimes' numerics
on identical inputs (`experiments.diag_lossless`).

Terms: a *forward* is one call of the whole model (a prefill or one decode step); the probe's
`forwards[f][i]` is decoder layer i's output hidden state [T, H] in forward f, copied to the host
in the model's dtype (exact: no rounding is added by the copy).
Invariants: a forward calls every decoder layer once, in order, so layer 0's output opens a new
forward; the hooks only read (they return None), so the probed computation is unchanged. The hooks
are torch forward hooks, which CUDA graphs cannot keep (`spmoe.runtime.graphs.graph_safe`): close
the probe before a graphed step.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (`model.model.layers`)."""
    return list(model.model.layers)


class LayerProbe:
    """Forward hooks on every decoder layer recording its output, as a context manager.

    Args:
        model: a transformers causal LM (the runtime's `model`).
        max_forwards: stop recording after this many forwards (None: every forward while open).

    Example:
        with LayerProbe(runtime.model) as probe:
            decoder.forward(prompt_ids, 1)
        probe.forwards[0][3]  # layer 3's output over the prompt, [T, H] on the host
    """

    def __init__(self, model: nn.Module, max_forwards: int | None = None):
        self.layers = decoder_layers(model)
        self.max_forwards = max_forwards
        self.forwards: list[list[torch.Tensor]] = []
        self._handles: list = []
        self._recording = False

    def __enter__(self) -> "LayerProbe":
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer_idx: int):
        def hook(module: nn.Module, args, output) -> None:
            if layer_idx == 0:
                self._recording = self.max_forwards is None or len(self.forwards) < self.max_forwards
                if self._recording:
                    self.forwards.append([])
            if not self._recording:
                return
            hidden = output[0] if isinstance(output, tuple) else output  # [1, T, H]
            self.forwards[-1].append(hidden[0].detach().to("cpu", copy=True))  # [T, H]
        return hook


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
