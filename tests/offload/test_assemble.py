"""Assembly (`spmoe.offload.assemble`): a prefetching method whose cache has a slot for every expert starts
full and runs without prefetch (no predictor, no worker thread, no seam hook but adaptive gating's graph-safe
counters, so the forward may be captured whole), with the reference's greedy tokens and zero prefetch counts;
a cache too small prefetches as before; a run that records its routing keeps its predictors."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import pytest
from conftest import tiny_reference_session

from spmoe.config import CutoffConfig, MethodConfig, SpecConfig, TraceConfig
from spmoe.hooks import is_graph_safe
from spmoe.methods import get_strategy
from spmoe.models.experts import find_experts
from spmoe.offload.prefetch import PrefetchProvider
from spmoe.predict.adaptive_gating import AdaptiveGating
from spmoe.runtime.graphs import graph_safe
from spmoe.strategy import MethodContext
from spmoe.summary import summarize_run

TOKENS = 8
K = 2
PREFETCHERS = ["mixtral_offloading_nosd", "moe_infinity_nosd", "adapmoe_nosd", "mixtral_offloading", "moe_infinity",
               "adapmoe", "spmoe"]


@pytest.fixture(scope="module")
def session():
    s = tiny_reference_session("tiny", "tiny", 2, TOKENS)
    yield s
    s.close()


def _method(name: str, **kw) -> MethodConfig:
    return MethodConfig(name=name, cutoff=CutoffConfig(mode="all"), **kw)


def _build(s, name: str, num_slots: int | None = None, trace: TraceConfig | None = None, **kw):
    cfg = replace(s.cfg, method=_method(name, **kw), trace=trace or s.cfg.trace)
    plan = s.plan(cfg.hardware, name)
    if num_slots is not None:
        plan = replace(plan, num_slots=num_slots)
    spec = get_strategy(name)
    return spec.build(MethodContext(cfg, s.target, s.device, plan, s.draft if spec.speculative else None))


def _prefetch_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "spmoe-prefetch")


def _draft_hooks(s) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in s.draft.modules())


@pytest.mark.parametrize("name", PREFETCHERS)
def test_a_full_cache_attaches_no_prefetch(session, name, caplog):
    threads = _prefetch_threads()
    with caplog.at_level(logging.INFO, logger="spmoe.offload.assemble"):
        runtime = _build(session, name)
    try:
        assert runtime.cache.num_slots == len(session.target.layout.keys)
        assert runtime.prefetch is False
        assert any("prefetch off: every expert is resident" in r.getMessage() for r in caplog.records)
        assert _prefetch_threads() == threads  # no worker thread
        assert all(isinstance(listener, (PrefetchProvider, AdaptiveGating)) for listener in runtime.listeners)
        assert not runtime.draft_listeners and _draft_hooks(session) == 0
        experts = find_experts(runtime.model)
        assert all(is_graph_safe(h) for m in experts.values() for h in m.seam_hooks)  # gating's counters at most
        assert graph_safe(runtime.model, session.device)  # on CUDA: one graph per step
    finally:
        runtime.close()


@pytest.mark.parametrize("name", PREFETCHERS)
def test_a_cache_too_small_prefetches_as_before(session, name):
    threads = _prefetch_threads()
    runtime = _build(session, name, num_slots=len(session.target.layout.keys) - 4)
    try:
        assert runtime.prefetch is True
        assert _prefetch_threads() == threads + 1  # method.worker_thread (default on)
        assert any(not isinstance(listener, (PrefetchProvider, AdaptiveGating)) for listener in runtime.listeners)
        if name == "spmoe":
            assert runtime.draft_listeners and _draft_hooks(session) > 0
        else:
            experts = find_experts(runtime.model)
            assert all(any(not is_graph_safe(h) for h in m.seam_hooks) for m in experts.values())
            assert not graph_safe(runtime.model, session.device)
    finally:
        runtime.close()
    assert _draft_hooks(session) == 0


def test_recording_the_routing_keeps_the_predictors(session):
    runtime = _build(session, "spmoe", trace=TraceConfig(routing=True))
    try:
        assert runtime.prefetch is True and runtime.draft_listeners
    finally:
        runtime.close()


@pytest.mark.parametrize("name,gating", [("mixtral_offloading_nosd", None), ("moe_infinity_nosd", None),
                                         ("adapmoe_nosd", False), ("adapmoe_nosd", True), ("spmoe", None)])
def test_full_cache_runs_match_the_reference_and_report_zero_prefetch(session, name, gating):
    method = _method(name, worker_thread=False)
    if gating is not None:
        method.adaptive_gating = gating
    spec_cfg = SpecConfig(num_draft_tokens=K)
    gens, plan, peak = session.generate(method, session.cfg.hardware, TOKENS, spec_cfg=spec_cfg)
    extra = dict(session.last_extra)
    summary = summarize_run(session, method, session.cfg.hardware, gens, plan, peak, session.reference, spec_cfg)
    if not gating:
        assert [g.token_ids for g in gens] == session.reference
    assert summary["prefetching"] is False
    assert summary["expert_misses"] == 0 and summary["h2d_bytes"] == 0
    assert summary["prefetch_hits"] == summary["late_prefetches"] == summary["wasted_prefetches"] == 0
    assert summary.get("prefetches_issued", 0) == 0 and summary.get("prefetches_dropped", 0) == 0
    records = [r for g in gens for r in g.records]
    assert all(r.num_prefetched == r.num_dropped == r.num_wasted == 0 for r in records)
    if gating:
        assert extra["gating_routed"] > 0 and extra["gating_dropped"] <= extra["gating_routed"]
