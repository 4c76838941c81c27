"""The backbone: every registered method produces exactly the gpu_resident tokens (greedy)."""

from __future__ import annotations

import pytest

from conftest import tiny_run_config
from experiments.runner import open_session
from spmoe.config import MethodConfig
from spmoe.strategy import STRATEGIES, get_strategy

get_strategy("gpu_resident")  # populate the registry
METHODS = sorted(STRATEGIES)


@pytest.fixture(scope="module", params=["tiny", "tiny_qwen3_moe"])
def session(request):
    cfg = tiny_run_config(request.param, num_prompts=3, max_new_tokens=20)
    s = open_session(cfg)
    gens, _, _ = s.generate(MethodConfig(name="gpu_resident"), cfg.hardware, cfg.max_new_tokens)
    s.reference = [g.token_ids for g in gens]
    yield s
    s.close()


def _tokens(session, method: MethodConfig):
    gens, plan, _ = session.generate(method, session.cfg.hardware, session.cfg.max_new_tokens)
    return [g.token_ids for g in gens], gens, plan


@pytest.mark.parametrize("method", METHODS)
def test_method_matches_gpu_resident(session, method):
    tokens, gens, _ = _tokens(session, MethodConfig(name=method))
    assert tokens == session.reference
    assert all(len(t) == session.cfg.max_new_tokens for t in tokens)


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
@pytest.mark.parametrize("slots_per_topk", [1, 2])
def test_small_caches_stay_lossless_and_load(session, eviction, slots_per_topk):
    top_k = session.target.layout.top_k
    method = MethodConfig(name="lru_nosd", eviction=eviction, num_slots=top_k * slots_per_topk)
    tokens, gens, _ = _tokens(session, method)
    assert tokens == session.reference
    decode = [r for g in gens for r in g.records if r.phase == "decode"]
    misses = sum(len(ev.misses) for r in decode for ev in r.layers)
    bytes_moved = sum(r.h2d_bytes for r in decode)
    assert misses > 0
    assert bytes_moved == misses * session.target.layout.expert_bytes


def test_events_account_for_every_routed_expert(session):
    _, gens, _ = _tokens(session, MethodConfig(name="lru_nosd", num_slots=session.target.layout.top_k))
    layout = session.target.layout
    for r in (r for g in gens for r in g.records if r.phase == "decode"):
        assert [ev.layer for ev in r.layers] == list(layout.moe_layers)
        for ev in r.layers:
            assert sorted(ev.hits + ev.misses) == sorted(ev.needed)
            assert len(ev.needed) == layout.top_k  # one token routes to exactly top_k distinct experts
