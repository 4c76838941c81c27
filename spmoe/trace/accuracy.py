"""
Predictor accuracy from a recorded routing trace (`spmoe.trace.routing`), per MoE layer of the
model that replays it (`routing=replay`), for the cutoff policy's r_l (`spmoe.policy.cutoff`).

Set recall of layer l: over every verify row with k > 0 drafts and every draft token j < k, the
fraction of the experts verify position j routed at trace layer m(l) that the prediction for draft
token j named, m = `map_layer(l, L_replay, L_trace)` (the mapping replay uses). A missing
prediction (-1, e.g. past the recording run's cutoff) names no expert; sentinel routes (>= E, no
expert) are not counted. A layer with no counted route has recall 0.
"""

from __future__ import annotations

import numpy as np

from spmoe.trace.replay import map_layer
from spmoe.trace.routing import RoutingTrace


def trace_layer_recall(trace: RoutingTrace, num_layers: int) -> list[float] | None:
    """Per-layer set recall for a replay model of `num_layers` MoE layers (None: the trace has no drafts)."""
    num_drafts = int(trace.row_drafted.sum())  # K
    if num_drafts == 0:
        return None
    pos0, draft0 = trace.row_starts()
    pos_idx = np.repeat(pos0 - draft0, trace.row_drafted) + np.arange(num_drafts)  # [K]: verify position of draft i
    recall = []
    for layer in range(num_layers):
        m = map_layer(layer, num_layers, trace.num_layers)
        predicted = trace.predicted[:, m, :].astype(np.int64)  # [K, P]
        routed = trace.routes[pos_idx, m, :].astype(np.int64)  # [K, A]
        counted = (routed >= 0) & (routed < trace.num_experts)  # [K, A]
        named = (routed[:, :, None] == predicted[:, None, :]).any(axis=2) & counted  # [K, A]
        total = int(counted.sum())
        recall.append(float(named.sum()) / total if total else 0.0)
    return recall
