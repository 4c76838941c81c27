"""
Draft->target router agreement at every capture point, measured on whole sequences.

For each sequence the GPU-resident target runs once (its routers' chosen experts per MoE layer are
the truth) and the draft runs once per capture point (`attn_out`, `residual`, `ffn_input`); the
draft's hidden state at a point, fed to the target's router of the same layer, is the prediction.
Scores per (sequence, layer): top-1 accuracy and set recall (`spmoe.predict.capture.agreement`).
"""

from __future__ import annotations

import torch

from spmoe.config import HardwareConfig
from spmoe.methods import get_strategy
from spmoe.predict.capture import (
    CAPTURE_POINTS,
    agreement,
    capture_hidden,
    capture_routes,
    predict_routes,
)
from spmoe.strategy import MethodContext


@torch.inference_mode()
def router_agreement(session, sequences: list[list[int]], by_layer: dict | None = None,
                     ) -> dict[str, tuple[float, float]]:
    """capture point -> (top-1 accuracy, set recall), mean over MoE layers and sequences; `by_layer`,
    when given, is filled with (capture point, layer) -> [(top-1, recall) per sequence]."""
    layout = session.target.layout
    ctx = MethodContext(session.cfg, session.target, session.device, session.plan(
        HardwareConfig(name="unbudgeted", device=session.device.type), "gpu_resident"))
    runtime = get_strategy("gpu_resident").build(ctx)
    scores: dict[str, list[tuple[float, float]]] = {p: [] for p in CAPTURE_POINTS}
    try:
        for seq in sequences:
            ids = torch.tensor([seq], device=session.device)
            with capture_routes(runtime.model, layout.moe_layers) as routes:
                runtime.model(input_ids=ids, logits_to_keep=1)
            for point in CAPTURE_POINTS:
                with capture_hidden(session.draft, point) as hidden:
                    session.draft(input_ids=ids, logits_to_keep=1)
                for layer in layout.moe_layers:
                    pred = predict_routes(runtime.model, layer, hidden[layer])
                    scores[point].append(agreement(pred, routes[layer]))
                    if by_layer is not None:
                        by_layer.setdefault((point, layer), []).append(scores[point][-1])
    finally:
        runtime.close()
    return {p: (sum(s[0] for s in v) / len(v), sum(s[1] for s in v) / len(v)) for p, v in scores.items()}
