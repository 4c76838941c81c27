"""
Per-layer set recall of the draft->target-router predictor on calibration sequences, for the
cutoff policy's r_l (`spmoe.policy.cutoff`).

Teacher-forced: the draft and the target each read the same token sequences; the draft's hidden
state at position i (capture point, through the learned map for non-twinned pairs, from the
paired draft layer) goes through the target router's weight of layer l and its top-P experts are
compared with the A experts the target routed at position i (`agreement`'s set recall). Same
input token, same position: this is what `DraftRouterPredictor` does while drafting token j for
verify position j, with the same arithmetic (router weight only, top-P of the logits).
"""

from __future__ import annotations

import torch
from torch import nn

from spmoe.predict.capture import agreement, capture_hidden, capture_routes, router_of
from spmoe.predict.hidden_map import layer_pairs


@torch.no_grad()
def predictor_recall(draft: nn.Module, target: nn.Module, moe_layers: list[int], sequences: list[list[int]],
                     capture_point: str, top_k: int, maps: dict[int, torch.Tensor] | None,
                     device: torch.device) -> list[float]:
    """Set recall per MoE ordinal of `moe_layers` (the target's decoder-layer indices), pooled over sequences."""
    pairs = (layer_pairs(len(draft.model.layers), len(target.model.layers), moe_layers) if maps
             else {layer: layer for layer in moe_layers})
    hits = [0.0] * len(moe_layers)
    count = 0
    for seq in sequences:
        ids = torch.tensor([seq], device=device)
        with capture_hidden(draft, capture_point) as hidden:
            draft(input_ids=ids, logits_to_keep=1)
        with capture_routes(target, tuple(moe_layers)) as routes:
            target(input_ids=ids, logits_to_keep=1)
        for i, layer in enumerate(moe_layers):
            h = hidden[pairs[layer]]  # [T, H_d]
            weight = router_of(target, layer).weight  # [E, H_t]
            if maps:
                w = maps[layer].to(h.device)  # [H_d + 1, H_t]
                h = h.float() @ w[:-1] + w[-1]  # [T, H_t]
            logits = nn.functional.linear(h.to(weight.device, weight.dtype), weight)  # [T, E]
            predicted = logits.float().topk(top_k, dim=-1).indices  # [T, P], most probable first
            _, recall = agreement(predicted, routes[layer].to(predicted.device))
            hits[i] += recall * len(seq)
        count += len(seq)
    return [h / count for h in hits]
