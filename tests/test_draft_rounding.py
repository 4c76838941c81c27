"""experiments/draft_rounding: the rounding-sensitivity probe behind Table 1's Phi rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from experiments.draft_rounding import RouteRecorder, measure
from experiments.presets import load_preset
from spmoe.models.draft import build_draft, draft_hf_config

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 300}


def test_route_recorder_sees_every_sparse_layer_and_no_dense_one():
    for name, expected in (("phi_mini_moe_twin", 2), ("mistral_7b", 0)):
        cfg = load_preset("draft", name)
        cfg = replace(cfg, hf_config={**cfg.hf_config, **SMALL})
        model = build_draft(cfg, draft_hf_config(cfg), torch.device("cpu"), 7)
        routes = RouteRecorder(model)
        with torch.no_grad():
            model(torch.arange(5)[None])
        picks = routes.take()
        assert len(picks) == expected and routes.picks == []
        for p in picks:  # [T, top_k] expert ids, sorted per token
            assert p.shape == (5, 2) and (p[:, 0] <= p[:, 1]).all() and int(p.max()) < 16


@pytest.mark.parametrize("name,sparse", [("phi_mini_moe_twin", True), ("mistral_7b", False)])
def test_measure_row(name, sparse):
    row = measure(name, 16, 7, SMALL).strip("|").split("|")
    assert row[0].strip() == name and row[2].strip() == "cpu" and row[3].strip() == "16"
    assert float(row[4]) == 1.0  # folded attention is transformers' SDPA on the CPU
    assert 0.0 <= float(row[5]) <= 1.0
    assert (row[8].strip() == "- (dense)") != sparse
