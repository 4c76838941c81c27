"""Routing traces: recording, the file format, and replay (identity, depth mapping, plain-decoding
replay of an SD trace, replayed predictions, clear errors)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.summary import distinct_token_ratio
from spmoe.config import CutoffConfig, MethodConfig, RoutingConfig, SpecConfig, TraceConfig
import spmoe.trace.replay as replay_mod
from spmoe.hooks import is_graph_safe
from spmoe.models.experts import ExpertLayout
from spmoe.trace.replay import RouteReplay, map_layer
from spmoe.trace.routing import TraceError, load_trace

K, NEW = 2, 12
SPMOE = MethodConfig(name="spmoe", num_slots=8, worker_thread=False, cutoff=CutoffConfig(mode="all"))


def _cfg(depth: int = 4, replay: str | None = None, k: int = K, **kw):
    cfg = tiny_run_config("tiny", **{"num_prompts": 2, "max_new_tokens": NEW, **kw})
    cfg.model.hf_config = {**cfg.model.hf_config, "num_hidden_layers": depth}
    cfg.draft = load_preset("draft", "tiny")
    cfg.draft.hf_config = {**cfg.draft.hf_config, "num_hidden_layers": depth}
    cfg.spec = SpecConfig(num_draft_tokens=k)
    cfg.trace = TraceConfig(routing=True)
    if replay:
        cfg.routing = RoutingConfig(name="replay", trace_path=replay)
    return cfg


def _events(gens):
    return [[(e.layer, e.needed, e.hits, e.misses, e.prefetch_hits, e.late, e.predicted) for e in r.layers]
            for g in gens for r in g.records]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """An spmoe run (k=2, prefetch at every layer, inline worker) with its routing recorded."""
    path = tmp_path_factory.mktemp("trace") / "routing_trace.npz"
    s = open_session(_cfg())
    try:
        gens, _, _ = s.generate(SPMOE, s.cfg.hardware, NEW)
        mixtral, _, _ = s.generate(MethodConfig(name="mixtral_offloading", num_slots=8, worker_thread=False), s.cfg.hardware, NEW)
        s.generate(SPMOE, s.cfg.hardware, NEW)  # the spmoe recording is the last one
        s.last_routing.save(path)
    finally:
        s.close()
    return path, gens, mixtral


def test_trace_file_round_trip(recorded):
    path, gens, _ = recorded
    t = load_trace(path)
    assert t.meta["format_version"] == 2 and t.route_weights.shape == t.routes.shape and t.meta["spec_k"] == K and t.meta["method"] == "spmoe"
    records = [r for g in gens for r in g.records]
    assert len(t.row_step) == len(records)
    assert t.routes.shape == (int(t.row_positions.sum()), 4, 2)
    assert t.predicted.shape == (sum(r.num_drafted or 0 for r in records), 4, 2)
    assert (t.predicted >= 0).all()  # cutoff=all: every layer predicted for every draft token
    assert [t.generation(i) for i in range(2)] == [g.token_ids for g in gens]
    assert list(t.row_accepted) == [-1 if r.phase == "prefill" else r.num_accepted or 0 for r in records]
    # the last layer has no lookahead; the others do
    assert (t.lookahead[:, -1] == -1).all() and (t.lookahead[:, 0, 0] >= 0).all()


def test_replay_on_the_same_model_is_identical(recorded):
    path, gens, mixtral = recorded
    s = open_session(_cfg(replay=str(path)))
    try:
        again, _, _ = s.generate(SPMOE, s.cfg.hardware, NEW)
        assert [g.token_ids for g in again] == [g.token_ids for g in gens]
        assert _events(again) == _events(gens)
        assert s.last_extra["routing"] == "replay"
        t = load_trace(path)
        assert np.array_equal(s.last_routing.routes, t.routes)
        assert np.array_equal(s.last_routing.predicted, t.predicted)
        # gate-lookahead guesses are replayed too
        mo, _, _ = s.generate(MethodConfig(name="mixtral_offloading", num_slots=8, worker_thread=False), s.cfg.hardware, NEW)
        assert _events(mo) == _events(mixtral)
    finally:
        s.close()


def test_replay_onto_a_deeper_model_follows_the_layer_map(recorded):
    path, _, _ = recorded
    t = load_trace(path)
    s = open_session(_cfg(depth=6, replay=str(path)))
    try:
        s.generate(MethodConfig(name="lru", num_slots=8), s.cfg.hardware, NEW)
        r = s.last_routing
        assert r.routes.shape == (t.routes.shape[0], 6, 2)
        for layer in range(6):
            assert np.array_equal(r.routes[:, layer], t.routes[:, map_layer(layer, 6, 4)])
        assert list(r.row_accepted) == list(t.row_accepted)  # the acceptance outcomes are the trace's
        gens, _, _ = s.generate(MethodConfig(name="lru", num_slots=8), s.cfg.hardware, NEW)
        traced = [t.generation(i) for i in range(2)]
        assert [g.token_ids for g in gens] != traced  # another model's tokens...
        assert distinct_token_ratio(s, gens) == sum(len(set(x)) / len(x) for x in traced) / 2  # ...the trace's text
    finally:
        s.close()


def test_layer_map():
    assert [map_layer(i, 6, 4) for i in range(6)] == [0, 0, 1, 2, 2, 3]
    assert [map_layer(i, 4, 4) for i in range(4)] == [0, 1, 2, 3]
    real = [map_layer(i, 32, 30) for i in range(32)]  # the real pair's 30 layers onto Mixtral's 32
    assert real[0] == 0 and real[-1] == 29 and sorted(set(real)) == list(range(30))
    assert all(b - a in (0, 1) for a, b in zip(real, real[1:]))


def test_plain_decoding_replays_the_committed_positions(recorded):
    path, _, _ = recorded
    t = load_trace(path)
    s = open_session(_cfg(replay=str(path)))
    try:
        s.generate(MethodConfig(name="lru_nosd", num_slots=8), s.cfg.hardware, NEW)
        r = s.last_routing
        pos0, _ = t.row_starts()
        committed = np.concatenate([
            np.arange(pos0[i], pos0[i] + (t.row_positions[i] if t.row_accepted[i] < 0 else t.row_accepted[i] + 1))
            for i in range(len(t.row_step))])
        assert np.array_equal(r.routes, t.routes[committed])
        assert (r.row_positions[r.row_step > 0] == 1).all()
    finally:
        s.close()


def test_replay_errors(recorded, tmp_path):
    path, _, _ = recorded
    with pytest.raises(TraceError, match="expert count and top-k"):
        cfg = _cfg(replay=str(path))
        cfg.model.hf_config = {**cfg.model.hf_config, "num_local_experts": 4}
        open_session(cfg)
    with pytest.raises(TraceError, match="num_draft_tokens=2"):
        open_session(_cfg(replay=str(path), k=3, method="lru"))
    with pytest.raises(TraceError, match="num_prompts=5"):
        open_session(_cfg(replay=str(path), num_prompts=5))
    with pytest.raises(TraceError, match="max_new_tokens=50"):
        open_session(_cfg(replay=str(path), max_new_tokens=50))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_session(_cfg(replay=str(tmp_path / "nope.npz")))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not a readable"):
        load_trace(bad)
    with pytest.raises(ValueError, match="valid: model, replay"):
        cfg = _cfg()
        cfg.routing = RoutingConfig(name="oracle")
        open_session(cfg)


def test_sd_cannot_replay_a_plain_decoding_trace(tmp_path):
    s = open_session(_cfg())
    try:
        s.generate(MethodConfig(name="lru_nosd", num_slots=8), s.cfg.hardware, NEW)
        s.last_routing.save(tmp_path / "nosd.npz")
    finally:
        s.close()
    with pytest.raises(TraceError, match="without SD"):
        open_session(_cfg(replay=str(tmp_path / "nosd.npz"), method="lru"))


def test_validate_rejects_inconsistent_traces(recorded, tmp_path):
    t = load_trace(recorded[0])
    with pytest.raises(TraceError, match="do not cover"):
        dataclasses.replace(t, routes=t.routes[:-1]).validate()
    with pytest.raises(TraceError, match="format_version"):
        dataclasses.replace(t, meta={**t.meta, "format_version": 99}).validate()
    with pytest.raises(TraceError, match="not steps"):
        dataclasses.replace(t, row_step=t.row_step[::-1].copy()).validate()


@pytest.mark.parametrize("top1_weight,drops", [(0.9, True), (0.6, False)])
def test_adaptive_gating_acts_on_the_replayed_weights(recorded, tmp_path, top1_weight, drops):
    t = load_trace(recorded[0])
    weights = np.empty_like(t.route_weights)
    weights[..., 0], weights[..., 1] = top1_weight, 1 - top1_weight
    path = tmp_path / "weights.npz"
    dataclasses.replace(t, route_weights=weights).save(path)
    s = open_session(_cfg(replay=str(path)))
    try:
        gens, _, _ = s.generate(MethodConfig(name="adapmoe", num_slots=8, worker_thread=False), s.cfg.hardware, NEW)
        decode = [e for g in gens for r in g.records if r.phase == "decode" for e in r.layers]
        if drops:  # 0.9 >= the 0.85 threshold: every decode token keeps only its replayed top-1 expert
            assert s.last_extra["gating_drop_rate"] == 0.5
            pos0, _ = t.row_starts()
            first = t.row_step > 0
            top1 = {int(e) for i in np.flatnonzero(first) for e in t.routes[pos0[i]: pos0[i] + t.row_positions[i], 0, 0]}
            assert {e for ev in decode if ev.layer == 0 for e in ev.needed} <= top1
        else:
            assert s.last_extra["gating_dropped"] == 0
    finally:
        s.close()


def test_format_1_traces_replay_with_the_models_own_weights(recorded, tmp_path):
    t = load_trace(recorded[0])
    old = dataclasses.replace(t, meta={**t.meta, "format_version": 1}, route_weights=None)
    old.save(tmp_path / "v1.npz")
    assert load_trace(tmp_path / "v1.npz").route_weights is None
    s = open_session(_cfg(replay=str(tmp_path / "v1.npz")))
    try:
        s.generate(MethodConfig(name="lru", num_slots=8), s.cfg.hardware, NEW)
        assert np.array_equal(s.last_routing.routes, t.routes)
    finally:
        s.close()


def test_replay_hooks_are_graph_safe_and_steps_read_static_buffers(recorded, monkeypatch):
    """Decode and verify steps (T <= k + 1) are served from the replay's static device buffers, so a
    CUDA graph that captured the hook replays each step's routes: same routes as the per-step tensors,
    and with routing.graphs the hooks carry the graph-safe mark (`spmoe.runtime.graphs.graph_safe`
    accepts them)."""
    path, _, _ = recorded
    t = load_trace(path)
    layout = ExpertLayout((0, 1, 2, 3), t.num_experts, t.top_k, 8, 4, torch.float32)
    model = torch.nn.Module()
    model.routers = torch.nn.ModuleList(torch.nn.Identity() for _ in layout.moe_layers)  # stand-in routers
    monkeypatch.setattr(replay_mod, "router_of", lambda m, layer: m.routers[layer])
    plain = RouteReplay(t, layout, speculative=True, num_draft_tokens=K)  # routing.graphs off: never captured
    plain.install(model)
    assert not any(is_graph_safe(h) for r in model.routers for h in r._forward_hooks.values())
    plain.remove()
    replay = RouteReplay(t, layout, speculative=True, num_draft_tokens=K, graphs=True)
    replay.install(model)
    assert all(is_graph_safe(h) for r in model.routers for h in r._forward_hooks.values())
    weights, index = torch.zeros(64, t.top_k), torch.zeros(64, t.top_k, dtype=torch.long)  # the router's own
    for step in range(4):  # the prefill (per-step tensors), then verify steps (static buffers)
        replay.begin_step(step)
        rows = replay._row["positions"]
        want = torch.from_numpy(t.routes[rows].astype(np.int64))  # [T, L, A] (same depth: identity map)
        for layer, router in enumerate(model.routers):
            _, w, i = router(("h", weights[:len(rows)], index[:len(rows)]))
            assert torch.equal(i, want[:, layer])
            assert torch.allclose(w, torch.from_numpy(t.route_weights[rows][:, layer]))
        assert replay._static_step == (step > 0)
    assert i.data_ptr() != replay._static[0].data_ptr()  # a copy: the next step may overwrite the buffer


def test_a_routed_forward_outside_a_step_is_an_error_unless_graphs_capture_it(recorded, monkeypatch):
    t = load_trace(recorded[0])
    layout = ExpertLayout((0, 1, 2, 3), t.num_experts, t.top_k, 8, 4, torch.float32)
    model = torch.nn.Module()
    model.routers = torch.nn.ModuleList(torch.nn.Identity() for _ in layout.moe_layers)
    monkeypatch.setattr(replay_mod, "router_of", lambda m, layer: m.routers[layer])
    out = ("h", torch.zeros(1, t.top_k), torch.zeros(1, t.top_k, dtype=torch.long))
    plain = RouteReplay(t, layout, speculative=True, num_draft_tokens=K)
    plain.install(model)
    with pytest.raises(TraceError, match="outside an engine step"):
        model.routers[0](out)
    plain.remove()
    graphed = RouteReplay(t, layout, speculative=True, num_draft_tokens=K, graphs=True)
    graphed.install(model)
    assert model.routers[0](out)[2].shape == (1, t.top_k)  # a graph's warm-up before any step: static buffers


def test_checks_sharing_one_reference_each_replay_their_prompts_from_the_start(recorded):
    """An experiment's cases share one reference runtime: the second case's check must replay the
    trace's prompt 0 again, not carry on from where the first check stopped."""
    from spmoe.trace.lossless import ReferenceRuntime, check_lossless

    s = open_session(_cfg(replay=str(recorded[0])))
    try:
        runs = [s.generate(m, s.cfg.hardware, NEW)[0] for m in (SPMOE, MethodConfig(name="lru", num_slots=8))]
        with ReferenceRuntime(s) as reference:
            checks = [check_lossless(s, gens, reference=reference) for gens in runs]
        assert [c.replay_verified_argmax for c in checks] == [True, True], [c.reason for c in checks]
        with pytest.raises(TraceError, match="the trace holds 2"):
            reference.get()
            reference.replay.seek(2)
    finally:
        s.close()
