"""On CUDA: offloaded methods under `hardware.decode=graphs` (piecewise segment graphs and the call
sites' expert graphs, at one-token decode and (k + 1)-token verify shapes; the baselines' predictors as
seam hooks) give the tokens and expert events (prefetch hits included) of the same method run eagerly
over the static cache; a replayed trace gives the same with
`routing.graphs` on (the router hooks captured, routes read from static buffers) as with it off."""

from __future__ import annotations

from dataclasses import replace

import logging

import pytest
import torch
from conftest import tiny_run_config

from experiments.presets import load_preset
from spmoe.config import CutoffConfig, MethodConfig, RoutingConfig, SpecConfig, TraceConfig
from spmoe.offload.prefetch import PrefetchRequest
from spmoe.runtime.streams import dedicated_stream
from spmoe.session import open_session

K, NEW = 2, 16
METHODS = [MethodConfig(name="lru_nosd", num_slots=6), MethodConfig(name="lru", num_slots=6),
           MethodConfig(name="spmoe", num_slots=6, worker_thread=False, cutoff=CutoffConfig(mode="all"))]
BASELINES = [MethodConfig(name=n, num_slots=8, worker_thread=False) for n in (
    "moe_infinity_nosd", "mixtral_offloading_nosd", "mixtral_offloading", "moe_infinity", "adapmoe_nosd", "adapmoe")]


def _cfg(**kw):
    cfg = tiny_run_config("tiny", weights="twin", hardware=load_preset("hardware", "h200"), num_prompts=2,
                          max_new_tokens=NEW, **kw)
    cfg.model.dtype = "bfloat16"
    cfg.model.twin.expert_noise = 0.5
    cfg.draft = load_preset("draft", "tiny", dtype="bfloat16")
    cfg.spec = SpecConfig(num_draft_tokens=K)
    return cfg


def _run(s, method: MethodConfig, decode: str):
    gens, _, _ = s.generate(method, replace(s.cfg.hardware, decode=decode), NEW)
    events = [[(ev.layer, ev.needed, ev.hits, ev.misses, ev.prefetch_hits) for r in g.records for ev in r.layers]
              for g in gens]
    return [g.token_ids for g in gens], events


@pytest.mark.parametrize("method", METHODS + BASELINES, ids=lambda m: m.name)
def test_graphed_offloaded_decode_gives_the_static_runs_tokens_and_events(gpu, method, caplog):
    s = open_session(_cfg())
    try:
        static = _run(s, method, "static")
        with caplog.at_level(logging.INFO, logger="spmoe.runtime.decoder"):
            graphs = _run(s, method, "graphs")
        assert "MixtralForCausalLM on cuda: CUDA graphs piecewise" in caplog.text
        if method.name == "spmoe":  # its predictor's hooks no longer keep the draft from being captured
            assert "MistralForCausalLM on cuda: CUDA graphs whole" in caplog.text
        assert graphs[0] == static[0]
        assert graphs[1] == static[1]
        assert sum(len(ev[3]) for p in graphs[1] for ev in p) > method.num_slots  # it evicts
        if method in BASELINES:
            assert any(ev[4] for p in graphs[1] for ev in p)  # the predictors prefetched at the seams
    finally:
        s.close()


def test_replayed_routing_under_graphs_matches_it_uncaptured(gpu, tmp_path):
    path = tmp_path / "routing_trace.npz"
    s = open_session(_cfg(trace=TraceConfig(routing=True)))
    try:
        recorded = _run(s, METHODS[2], "static")
        s.last_routing.save(path)
    finally:
        s.close()
    s = open_session(_cfg(routing=RoutingConfig(name="replay", trace_path=str(path))))
    try:
        for method in METHODS:
            s.cfg.routing.graphs = False
            plain = _run(s, method, "graphs")
            s.cfg.routing.graphs = True
            graphed = _run(s, method, "graphs")
            assert graphed == plain, method.name
            if method.name == "spmoe":
                assert plain[1] == recorded[1]
    finally:
        s.close()


@pytest.mark.parametrize("name", ["mixtral_offloading", "adapmoe"])
def test_gate_lookahead_with_its_worker_thread_under_graphs(gpu, name):
    """The baselines that prefetch at every layer of verification, with their worker thread copying while the
    call sites' expert graphs are captured (on the capture stream, never the worker's): the static run's tokens."""
    method = MethodConfig(name=name, num_slots=8, worker_thread=True)
    s = open_session(_cfg())
    try:
        assert _run(s, method, "graphs")[0] == _run(s, method, "static")[0]
    finally:
        s.close()


def test_seam_hooks_never_run_on_the_capture_stream(gpu, monkeypatch):
    """Gate lookahead's predictions (pinned buffers the worker frees later) are copied on the ambient stream, at
    piecewise capture as at replay: a buffer used on the capture stream would be fenced, when freed, while that
    stream captures, and the host allocator's next query of the fence fails (`spmoe.runtime.piecewise`)."""
    capture = dedicated_stream(torch.device("cuda"), "capture")
    on_capture = []
    from_ids = PrefetchRequest.from_ids.__func__

    def spy(cls, *args):
        on_capture.append(torch.cuda.current_stream() == capture)
        return from_ids(cls, *args)

    monkeypatch.setattr(PrefetchRequest, "from_ids", classmethod(spy))
    s = open_session(_cfg())
    try:
        _run(s, MethodConfig(name="mixtral_offloading_nosd", num_slots=8, worker_thread=True), "graphs")
    finally:
        s.close()
    assert on_capture and not any(on_capture)


@pytest.mark.parametrize("name", ["mixtral_offloading_nosd", "moe_infinity_nosd", "adapmoe_nosd", "adapmoe"])
def test_full_cache_prefetchers_capture_whole_graphs(gpu, name, caplog):
    """Every expert fits (the card's budget): no predictor, so the target is captured whole, with the static
    run's tokens; AdapMoE's gating counters, captured with it, count what the static run counts."""
    method = MethodConfig(name=name)
    s = open_session(_cfg())
    try:
        static = _run(s, method, "static")
        counted = {k: v for k, v in s.last_extra.items() if k.startswith("gating_")}
        with caplog.at_level(logging.INFO, logger="spmoe.runtime.decoder"):
            graphs = _run(s, method, "graphs")
        assert "MixtralForCausalLM on cuda: CUDA graphs whole" in caplog.text
        assert s.last_extra["prefetching"] is False
        assert graphs == static
        assert {k: v for k, v in s.last_extra.items() if k.startswith("gating_")} == counted
    finally:
        s.close()


@pytest.mark.parametrize("name", ["lru_nosd", "lru"])
def test_piecewise_graphs_are_captured_before_the_timed_steps(gpu, name, monkeypatch):
    """Every piecewise graph an offloaded run replays was captured dry at `Engine.reserve`, none inside a step."""
    from spmoe.runtime.piecewise import PiecewiseGraph

    built = []
    init = PiecewiseGraph.__init__

    def spy(self, *args, dry=False, **kwargs):
        built.append(dry)
        init(self, *args, dry=dry, **kwargs)

    monkeypatch.setattr(PiecewiseGraph, "__init__", spy)
    s = open_session(_cfg())
    try:
        tokens, _ = _run(s, MethodConfig(name=name, num_slots=6), "graphs")
    finally:
        s.close()
    assert built and all(built), built
    assert tokens
