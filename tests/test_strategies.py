"""The backbone: every registered method produces exactly the gpu_resident tokens (greedy),
with and without speculative decoding, on two model families."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import open_with_reference, tiny_run_config
from experiments.presets import load_preset
from spmoe.config import MethodConfig, SpecConfig
from spmoe.methods import STRATEGIES, get_strategy
from spmoe.models.experts import OffloadedExperts
from spmoe.strategy import MethodContext

get_strategy("gpu_resident")  # populate the registry
METHODS = sorted(STRATEGIES)
DRAFT_OF = {"tiny": "tiny", "tiny_qwen3_moe": "tiny_qwen3"}


@pytest.fixture(scope="module", params=["tiny", "tiny_qwen3_moe"])
def session(request):
    cfg = tiny_run_config(request.param, num_prompts=3, max_new_tokens=20)
    cfg.draft = load_preset("draft", DRAFT_OF[request.param])
    s = open_with_reference(cfg, cfg.max_new_tokens)
    yield s
    s.close()


def _run(session, method: MethodConfig, k: int = 1):
    gens, plan, _ = session.generate(method, session.cfg.hardware, session.cfg.max_new_tokens,
                                     spec_cfg=SpecConfig(num_draft_tokens=k))
    return [g.token_ids for g in gens], gens


@pytest.mark.parametrize("method", METHODS)
def test_method_matches_gpu_resident(session, method):
    # adaptive gating (adapmoe) changes outputs by design: the equivalence is checked with it off
    tokens, gens = _run(session, MethodConfig(name=method, adaptive_gating=False))
    assert tokens == session.reference
    assert all(len(t) == session.cfg.max_new_tokens for t in tokens)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("method", [m for m in METHODS if STRATEGIES[m].speculative])
def test_sd_is_lossless_for_every_k(session, method, k):
    slots = max(session.target.layout.top_k * 2, len(session.target.layout.moe_layers))  # per-layer caches need 1/layer
    tokens, gens = _run(session, MethodConfig(name=method, num_slots=slots, adaptive_gating=False), k)
    assert tokens == session.reference
    decode = [r for g in gens for r in g.records if r.phase == "decode" and r.num_drafted is not None]
    assert decode and all(0 <= r.num_accepted <= r.num_drafted <= k for r in decode)
    assert all(r.num_emitted == r.num_accepted + 1 for r in decode)
    assert sum(r.num_emitted for g in gens for r in g.records) == 3 * session.cfg.max_new_tokens


@pytest.mark.parametrize("method", ["lru_nosd", "spmoe"])
@pytest.mark.parametrize("eviction", ["lru", "lfu", "layer_distance", "expected_reuse"])
@pytest.mark.parametrize("slots_per_topk", [1, 2])
def test_small_caches_stay_lossless_and_load(session, method, eviction, slots_per_topk):
    top_k = session.target.layout.top_k
    tokens, gens = _run(session, MethodConfig(name=method, eviction=eviction, num_slots=top_k * slots_per_topk))
    assert tokens == session.reference
    decode = [r for g in gens for r in g.records if r.phase == "decode"]
    misses = sum(len(ev.misses) for r in decode for ev in r.layers)
    prefetched = sum(r.num_prefetched for r in decode)  # spmoe's speculative copies (0 for lru_nosd)
    bytes_moved = sum(r.h2d_bytes for r in decode)
    assert misses > 0
    assert bytes_moved == (misses + prefetched) * session.target.layout.expert_bytes


def test_events_account_for_every_routed_expert(session):
    _, gens = _run(session, MethodConfig(name="lru_nosd", num_slots=session.target.layout.top_k))
    layout = session.target.layout
    for r in (r for g in gens for r in g.records if r.phase == "decode"):
        assert [ev.layer for ev in r.layers] == list(layout.moe_layers)
        for ev in r.layers:
            assert sorted(ev.hits + ev.misses) == sorted(ev.needed)
            assert len(ev.needed) == layout.top_k  # one token routes to exactly top_k distinct experts


def test_sd_verify_needs_the_union_of_experts(session):
    """k+1 verified tokens need more distinct experts per layer than one token does."""
    _, gens = _run(session, MethodConfig(name="lru"), k=5)
    layout = session.target.layout
    sizes = [len(ev.needed) for g in gens for r in g.records if r.phase == "decode" and r.num_drafted == 5
             for ev in r.layers]
    assert sizes and max(sizes) > layout.top_k
    assert all(layout.top_k <= n <= min(layout.num_experts, 6 * layout.top_k) for n in sizes)


@pytest.mark.parametrize("method", ["lru_nosd", "spmoe", "mixtral_offloading_nosd", "spmoe_plus"])
def test_a_cache_with_a_slot_for_every_expert_starts_full(session, method):
    """With room for every expert (per layer where the cache is partitioned) the run never misses and moves no
    expert bytes, prefill included; one slot fewer and it starts empty and loads on demand."""
    total = len(session.target.layout.keys)
    tokens, gens = _run(session, MethodConfig(name=method, num_slots=total))
    assert tokens == session.reference
    records = [r for g in gens for r in g.records]
    assert sum(len(ev.misses) for r in records for ev in r.layers) == 0
    assert sum(r.h2d_bytes for r in records) == 0
    assert all(len({ev.layer for ev in r.layers}) == len(r.layers) for r in records)  # each layer recorded once
    if method == "mixtral_offloading_nosd":
        return  # its per-layer caches split fewer slots unevenly: no single "one fewer" case
    _, gens = _run(session, MethodConfig(name=method, num_slots=total - 1))
    assert sum(len(ev.misses) for g in gens for r in g.records for ev in r.layers) > 0


@pytest.mark.parametrize("method", ["lru_nosd", "spmoe", "moe_infinity_nosd", "spmoe_plus"])
def test_a_cache_that_started_full_serves_its_layers_without_a_host_sync(session, method):
    """Every experts module of a runtime whose cache started full is sync-free (so CUDA graphs may capture its
    forward), whether its provider loads on demand or prefetches; with one slot fewer none is."""
    cpu, total = torch.device("cpu"), len(session.target.layout.keys)
    for slots, sync_free in ((total, True), (total - 1, False)):
        cfg = replace(session.cfg, method=MethodConfig(name=method, num_slots=slots))
        plan = session.plan(cfg.hardware, method)
        ctx = MethodContext(cfg, session.target, cpu, replace(plan, num_slots=slots), session.draft)
        runtime = get_strategy(method).build(ctx)
        try:
            modules = [m for m in runtime.model.modules() if isinstance(m, OffloadedExperts)]
            assert modules and all(m.sync_free(cpu) == sync_free for m in modules)
        finally:
            runtime.close()
