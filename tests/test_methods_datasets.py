"""Every registered method runs through every dataset preset (prompts of real text, tokenized for
the tiny model) and emits the GPU-resident tokens (adaptive gating off, as in test_strategies)."""

from __future__ import annotations

import pytest

from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.config import MethodConfig
from spmoe.data.prompts import DATASETS
from spmoe.methods import STRATEGIES, get_strategy

get_strategy("gpu_resident")  # populate the registry
NEW = 6


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_method_runs_on_every_dataset(dataset):
    cfg = tiny_run_config("tiny", num_prompts=1, max_new_tokens=NEW)
    cfg.dataset = load_preset("dataset", dataset, max_prompt_tokens=48)
    cfg.draft = load_preset("draft", "tiny")
    s = open_session(cfg)
    try:
        assert s.prompts and 0 < len(s.prompts[0].token_ids) <= 48
        ref, _, _ = s.generate(MethodConfig(name="gpu_resident"), cfg.hardware, NEW)
        slots = len(s.target.layout.moe_layers) * 2  # per-layer caches need >= 1 slot per layer
        for name in sorted(STRATEGIES):
            gens, _, _ = s.generate(MethodConfig(name=name, num_slots=slots, adaptive_gating=False), cfg.hardware, NEW)
            assert [g.token_ids for g in gens] == [g.token_ids for g in ref], name
    finally:
        s.close()
