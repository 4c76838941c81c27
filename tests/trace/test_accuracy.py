"""Per-layer predictor recall read off a hand-made routing trace."""

from __future__ import annotations

import numpy as np
import pytest

from spmoe.trace.accuracy import trace_layer_recall
from spmoe.trace.routing import RoutingTrace

# 1 prompt, E=4, 2 traced layers, A=2, P=2. Rows: prefill (T=2), verify k=2 (T=3), verify k=1 (T=2).
# Positions 0-1 prefill, 2-4 row 1, 5-6 row 2; draft tokens 0-1 (row 1), 2 (row 2).
ROUTES = [  # [R=7, L=2, A=2]
    [[0, 1], [1, 2]],  # prefill: ignored (would give draft 0 a full hit at layer 0)
    [[0, 1], [1, 2]],
    [[0, 2], [1, 4]],  # row 1, position 0 <- draft 0; 4 = sentinel (no expert), not counted
    [[2, 3], [2, 3]],  # row 1, position 1 <- draft 1
    [[0, 1], [0, 1]],  # row 1, position 2 (bonus, not predicted): ignored
    [[1, 3], [3, 0]],  # row 2, position 0 <- draft 2
    [[0, 1], [0, 1]],  # row 2, position 1: ignored
]
PREDICTED = [  # [K=3, L=2, P=2]
    [[0, 1], [1, 0]],  # layer 0: {0,1} vs {0,2} -> 1/2 ; layer 1: {1,0} vs {1} -> 1/1
    [[3, 2], [0, 1]],  # layer 0: 2/2 ; layer 1: {0,1} vs {2,3} -> 0/2
    [[-1, -1], [2, 3]],  # layer 0: no prediction -> 0/2 ; layer 1: {2,3} vs {3,0} -> 1/2
]
# recall: layer 0 = (1 + 2 + 0) / 6 = 0.5 ; layer 1 = (1 + 0 + 1) / 5 = 0.4


def _trace(routes=ROUTES, predicted=PREDICTED, drafted=(0, 2, 1), accepted=(-1, 1, 0), positions=(2, 3, 2)):
    routes = np.array(routes, dtype=np.int16)
    predicted = np.array(predicted, dtype=np.int16).reshape(-1, 2, 2)
    rows = len(drafted)
    trace = RoutingTrace(
        meta={"format_version": 1, "num_experts": 4, "top_k": 2, "spec_k": 2},
        prompt_offsets=np.array([0, 2]), prompt_tokens=np.array([5, 6], dtype=np.int32),
        gen_offsets=np.array([0, 3]), gen_tokens=np.array([7, 8, 9], dtype=np.int32),
        row_prompt=np.zeros(rows, dtype=np.int32), row_step=np.arange(rows, dtype=np.int32),
        row_positions=np.array(positions, dtype=np.int32), row_drafted=np.array(drafted, dtype=np.int32),
        row_accepted=np.array(accepted, dtype=np.int32), routes=routes, predicted=predicted,
        lookahead=np.full((routes.shape[0], 2, 1, 2), -1, dtype=np.int16))
    trace.validate()
    return trace


def test_recall_per_layer_exact():
    assert trace_layer_recall(_trace(), 2) == pytest.approx([0.5, 0.4])


def test_recall_follows_the_replay_layer_mapping():
    assert trace_layer_recall(_trace(), 4) == pytest.approx([0.5, 0.5, 0.4, 0.4])  # m(l) = floor(l * 2 / 4)
    assert trace_layer_recall(_trace(), 1) == pytest.approx([0.5])


def test_trace_without_drafts_has_no_recall():
    plain = _trace(routes=ROUTES[:3], predicted=np.zeros((0, 2, 2)), drafted=(0, 0), accepted=(-1, 0),
                   positions=(2, 1))
    assert trace_layer_recall(plain, 2) is None
