"""Mixtral-Offloading (Eliseev & Mazur): lossless with and without SD on small per-layer caches,
the per-layer slot partition, and the next-layer gate lookahead on a hand-made model whose
residual stream barely changes between layers (against one where it changes a lot)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import baselines.mixtral_offloading  # noqa: F401  (registers the two strategies)
from baselines.mixtral_offloading import split_slots
from conftest import tiny_reference_session, tiny_run_config
from spmoe.session import open_session
from spmoe.config import MethodConfig, SpecConfig
from spmoe.predict.capture import router_of
from spmoe.methods import STRATEGIES
from spmoe.strategy import MethodContext
from spmoe.trace.metrics import summarize

DRAFT_OF = {"tiny": "tiny", "tiny_qwen3_moe": "tiny_qwen3"}
TOKENS = 16


@pytest.fixture(scope="module", params=["tiny", "tiny_qwen3_moe"])
def session(request):
    s = tiny_reference_session(request.param, DRAFT_OF[request.param], 2, TOKENS)
    yield s
    s.close()


def _run(s, method: MethodConfig, k: int = 1):
    gens, plan, _ = s.generate(method, s.cfg.hardware, TOKENS, spec_cfg=SpecConfig(num_draft_tokens=k))
    return [g.token_ids for g in gens], gens, plan


# -- (a) greedy output identical to gpu_resident, with evictions -----------------------------------

@pytest.mark.parametrize("name,k,slots_per_layer,worker", [
    ("mixtral_offloading_nosd", 1, 1, True),  # fewer slots than top_k: experts stream through one slot
    ("mixtral_offloading_nosd", 1, 2, False),
    ("mixtral_offloading", 1, 2, True),
    ("mixtral_offloading", 3, 1, False),
])
def test_lossless_on_small_per_layer_caches(session, name, k, slots_per_layer, worker):
    layout = session.target.layout
    num_slots = slots_per_layer * len(layout.moe_layers) + 1  # uneven: the first layer gets the extra slot
    tokens, gens, plan = _run(session, MethodConfig(name=name, num_slots=num_slots, worker_thread=worker), k)
    assert tokens == session.reference
    assert plan.num_slots == num_slots
    summary = summarize([g.records for g in gens])
    assert summary["expert_misses"] + summary["prefetches_issued"] > num_slots  # the cache had to evict
    if not worker:  # inline prefetch: deterministic; a worker thread's requests may be dropped when late
        assert summary["prefetch_hits"] + summary["late_prefetches"] > 0
    decode = [r for g in gens for r in g.records if r.phase == "decode"]
    predicted = [ev for r in decode for ev in r.layers if ev.predicted is not None]
    assert {ev.layer for ev in predicted} <= set(layout.moe_layers[1:])  # the first MoE layer is never predicted
    if STRATEGIES[name].speculative:
        assert sum(r.num_drafted is None for r in decode) <= len(gens)  # only a last step with room for 1 token
        if k > 1:  # the verify forward's k+1 positions: the union of their predictions is prefetched
            assert max(len(ev.predicted) for ev in predicted) > layout.top_k
    else:
        assert all(r.num_drafted is None for r in decode)


# -- (c) the per-layer partition -------------------------------------------------------------------

def _build(s, name: str, num_slots: int | None):
    method = MethodConfig(name=name, num_slots=num_slots, worker_thread=False)
    ctx = MethodContext(replace(s.cfg, method=method), s.target, s.device, s.plan(s.cfg.hardware, name))
    return STRATEGIES[name].build(ctx)


def test_two_slots_per_layer_and_layers_evict_only_their_own(session):
    layout = session.target.layout
    layers = layout.moe_layers
    runtime = _build(session, "mixtral_offloading_nosd", 2 * len(layers))
    try:
        cache = runtime.cache
        assert runtime.slots_per_layer == {layer: 2 for layer in layers}
        assert cache.num_slots == 2 * len(layers)
        for layer in layers:  # fill every layer's two slots
            for e in range(2):
                cache.admit((layer, e))
        for layer in layers:  # a third expert of a layer evicts that layer's LRU expert, never another layer's
            _, evicted = cache.admit((layer, 2))
            assert evicted == (layer, 0)
        assert set(cache.resident()) == {(layer, e) for layer in layers for e in (1, 2)}
    finally:
        runtime.close()


def test_slot_split_remainder_cap_and_too_few_slots(session):
    assert split_slots(10, (0, 1, 2, 3), 8) == {0: 3, 1: 3, 2: 2, 3: 2}
    assert split_slots(100, (0, 1), 8) == {0: 8, 1: 8}  # never more slots than a layer has experts
    layers = session.target.layout.moe_layers
    with pytest.raises(ValueError, match=rf"{len(layers) - 1} expert slots for {len(layers)} MoE layers"):
        _run(session, MethodConfig(name="mixtral_offloading_nosd", num_slots=len(layers) - 1))


def test_unbounded_plan_gives_every_layer_all_its_experts(session):
    layout = session.target.layout
    runtime = _build(session, "mixtral_offloading", None)
    try:
        assert runtime.slots_per_layer == {layer: layout.num_experts for layer in layout.moe_layers}
    finally:
        runtime.close()


# -- (b) the lookahead mechanism on a hand-made model ----------------------------------------------

@pytest.fixture(scope="module")
def deep():
    """An 8-layer tiny Mixtral whose routers all share layer 0's weights."""
    cfg = tiny_run_config("tiny", num_prompts=2, max_new_tokens=TOKENS)
    cfg.model.hf_config = dict(cfg.model.hf_config, num_hidden_layers=8)
    s = open_session(cfg)
    model, layers = s.target.model, s.target.layout.moe_layers
    with torch.no_grad():
        for layer in layers:
            router_of(model, layer).weight.copy_(router_of(model, layers[0]).weight)
    s.o_proj = {layer: model.model.layers[layer].self_attn.o_proj.weight.detach().clone() for layer in layers}
    yield s
    s.close()


def _lookahead_summary(s, attn_scale: float) -> dict:
    """Run with every attention output scaled by `attn_scale`: small keeps the residual stream (and so
    the router input) nearly the same from one layer to the next; large makes it change a lot."""
    model = s.target.model
    with torch.no_grad():
        for layer, weight in s.o_proj.items():
            model.model.layers[layer].self_attn.o_proj.weight.copy_(weight * attn_scale)
    try:
        slots = 2 * len(s.target.layout.moe_layers)  # top_k per layer: every new expert must be loaded
        _, gens, _ = _run(s, MethodConfig(name="mixtral_offloading_nosd", num_slots=slots, worker_thread=False))
    finally:
        with torch.no_grad():
            for layer, weight in s.o_proj.items():
                model.model.layers[layer].self_attn.o_proj.weight.copy_(weight)
    return summarize([g.records for g in gens])


def test_lookahead_prefetches_the_next_layers_experts_when_hidden_states_barely_change(deep):
    stable = _lookahead_summary(deep, 0.01)
    drifting = _lookahead_summary(deep, 100.0)
    assert stable["prefetch_hits"] > 0
    assert stable["predictor_recall"] > 0.8
    assert stable["prefetch_coverage"] > 0.5  # the first MoE layer (1/8 of the needs) is never covered
    assert stable["prefetch_waste"] < 0.3
    assert drifting["prefetch_coverage"] < stable["prefetch_coverage"] - 0.3
    assert drifting["predictor_recall"] < stable["predictor_recall"]
    assert stable["expert_misses"] < drifting["expert_misses"]
