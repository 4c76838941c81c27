"""
Capturing draft hidden states and target routes, the raw material of cross-model expert
prediction (SP-MoE: the draft's per-layer hidden state through the target's router of the
same layer predicts the experts verification will route).

Capture points on draft layer l (decoder layers of transformers Llama/Mistral/Qwen3 style):
- `attn_out`: the self-attention output, before the residual add;
- `residual`: the residual stream after the attention add (input of post_attention_layernorm);
- `ffn_input`: the normalized FFN input (output of post_attention_layernorm), i.e. exactly what
  the router of a twinned target sees.
Hooks are registered by the context managers and always removed on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

CAPTURE_POINTS = ("attn_out", "residual", "ffn_input")


@contextmanager
def capture_hidden(model: nn.Module, point: str) -> Iterator[dict[int, torch.Tensor]]:
    """Yield {layer: hidden [T, H]} filled by the model's next forward (last call wins)."""
    if point not in CAPTURE_POINTS:
        raise ValueError(f"unknown capture point {point!r}; valid: {list(CAPTURE_POINTS)}")
    out: dict[int, torch.Tensor] = {}
    handles = []
    for idx, layer in enumerate(model.model.layers):
        def keep(tensor: torch.Tensor, idx: int = idx) -> None:
            out[idx] = tensor.reshape(-1, tensor.shape[-1]).detach()

        if point == "attn_out":
            handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, keep=keep: keep(o[0])))
        elif point == "residual":
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, keep=keep: keep(a[0])))
        else:
            handles.append(layer.post_attention_layernorm.register_forward_hook(lambda m, a, o, keep=keep: keep(o)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_routes(model: nn.Module, moe_layers: tuple[int, ...]) -> Iterator[dict[int, torch.Tensor]]:
    """Yield {layer: top_k_index [T, A]} routed by the target's next forward."""
    out: dict[int, torch.Tensor] = {}
    handles = [model.model.layers[i].mlp.experts.register_forward_pre_hook(
        lambda m, a, i=i: out.__setitem__(i, a[1].detach())) for i in moe_layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def router_of(model: nn.Module, layer: int) -> nn.Module:
    mlp = model.model.layers[layer].mlp
    return mlp.gate if hasattr(mlp, "gate") else mlp.router


@torch.no_grad()
def predict_routes(target: nn.Module, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The target's router of `layer` applied to (draft) hidden states [T, H] -> top_k_index [T, A]."""
    router = router_of(target, layer)
    weight = next(router.parameters())
    return router(hidden.to(weight.dtype))[-1]


def agreement(predicted: torch.Tensor, actual: torch.Tensor) -> tuple[float, float]:
    """(top-1 accuracy, set recall) of predicted vs actual top_k_index [T, A] (top-1 first)."""
    top1 = (predicted[:, 0] == actual[:, 0]).float().mean().item()
    hits = (predicted[:, :, None] == actual[:, None, :]).any(dim=1).float()  # [T, A]: actual expert predicted
    return top1, hits.mean().item()
