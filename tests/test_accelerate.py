"""Tests for the `accelerate` method: same tokens as gpu_resident, accelerate's traffic counted, clean undo."""

from __future__ import annotations

import pytest
import torch

from baselines import accelerate_offload, gpu_resident
from spmoe.config import ModelConfig, RunConfig
from spmoe.engine import Engine
from spmoe.models.build import TargetModel, fill_store, hf_config, materialize, param_bytes, skeleton
from spmoe.offload.budget import MemoryPlan
from spmoe.offload.store import ExpertStore
from spmoe.methods import get_strategy
from spmoe.strategy import MethodContext

E, LAYERS, TOKENS = 8, 3, 12
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def target() -> TargetModel:
    cfg = ModelConfig(family="mixtral", dtype="float32", hf_config=dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2))
    hf_cfg = hf_config(cfg)
    model, layout = skeleton(hf_cfg, torch.float32)
    non_expert = param_bytes(model)
    materialize(model, cfg, CPU, seed=0)
    store = ExpertStore(layout, pin=False)
    fill_store(store, cfg, CPU, seed=0, std=0.2)  # large enough that routing differs between tokens
    return TargetModel(model, layout, store, non_expert, "random")


def _ctx(target: TargetModel, num_slots: int) -> MethodContext:
    layout = target.layout
    plan = MemoryPlan(None, target.non_expert_bytes, 0, 0, 0, 0, layout.expert_bytes, len(layout.keys), num_slots)
    return MethodContext(RunConfig(), target, CPU, plan)


PROMPT = [5, 17, 99, 3, 250, 42, 7]


def _run(runtime, prompt=PROMPT):
    try:
        return Engine(runtime, CPU).generate(prompt, TOKENS)
    finally:
        runtime.close()


def test_registered():
    spec = get_strategy("accelerate")
    assert spec.offloads and spec.build is accelerate_offload.build


def test_resident_layer_count():
    assert accelerate_offload.resident_layer_count(24, 8, 3) == 3  # everything fits: nothing reserved
    assert accelerate_offload.resident_layer_count(23, 8, 3) == 1  # one layer's room kept for the moves
    assert accelerate_offload.resident_layer_count(16, 8, 3) == 1
    assert accelerate_offload.resident_layer_count(15, 8, 3) == 0
    assert accelerate_offload.resident_layer_count(2, 8, 3) == 0


@pytest.mark.parametrize("num_slots", [8, 16, 24])
def test_same_tokens_bytes_and_undo(target, num_slots):
    layout = target.layout
    ref = _run(gpu_resident.build(_ctx(target, len(layout.keys))))
    assert len(set(ref.token_ids)) > 1

    gen = _run(accelerate_offload.build(_ctx(target, num_slots)))
    assert gen.token_ids == ref.token_ids

    n_off = LAYERS - accelerate_offload.resident_layer_count(num_slots, E, LAYERS)
    per_forward = n_off * E * layout.expert_bytes
    assert [r.h2d_bytes for r in gen.records] == [per_forward] * TOKENS
    assert sum(r.h2d_bytes for r in gen.records) == n_off * E * layout.expert_bytes * TOKENS
    assert all(r.copy_ms >= 0 and r.stall_ms == r.copy_ms for r in gen.records)
    if n_off == 0:
        assert all(r.copy_ms == 0 for r in gen.records)
    for rec in gen.records:
        assert [ev.layer for ev in rec.layers] == list(layout.moe_layers)
        for rank, ev in enumerate(rec.layers):
            assert len(ev.needed) >= layout.top_k
            if rank < LAYERS - n_off:
                assert ev.hits == ev.needed and ev.misses == []
            else:
                assert ev.misses == ev.needed and ev.hits == []

    # undone: no hooks or parameters left, and another method installs its own experts on the same model
    for idx in layout.moe_layers:
        experts = target.model.model.layers[idx].mlp.experts
        assert not hasattr(experts, "_hf_hook") and not list(experts.parameters())
    again = _run(gpu_resident.build(_ctx(target, len(layout.keys))))
    assert again.token_ids == ref.token_ids
    assert all(r.h2d_bytes == 0 for r in again.records)


def test_no_second_host_copy(target):
    """Offloaded layers reference the store's buffers (accelerate's weights_map), not copies of them."""
    layout = target.layout
    runtime = accelerate_offload.build(_ctx(target, 8))  # every layer offloaded
    try:
        for idx in layout.moe_layers:
            hook = target.model.model.layers[idx].mlp.experts._hf_hook
            assert hook.offload
            for e in range(E):
                assert hook.weights_map[f"expert_{e}"].data_ptr() == target.store.flat((idx, e)).data_ptr()
            assert all(p.device.type == "meta" for p in target.model.model.layers[idx].mlp.experts.parameters())
    finally:
        runtime.close()
