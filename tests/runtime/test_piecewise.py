"""Piecewise graphs: the step is cut at every experts call, the experts run eagerly between segments.

Capture itself needs CUDA; on the CPU a stand-in graph records the protocol (capture begins and ends,
replays) while the ops run eagerly, which checks the cutting: one segment per experts call plus one,
the capture pass computes the real step, and a replay runs every layer's experts once, in order."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar

import pytest
import torch
from conftest import tiny_run_config

from spmoe.methods import get_strategy
from spmoe.models.experts import OffloadedExperts, on_experts_call
from spmoe.runtime.decoder import StaticDecoder
from spmoe.hooks import mark_graph_safe
from spmoe.runtime.graphs import capturable, graph_safe
from spmoe.runtime.piecewise import PiecewiseGraph, piecewise_capturable
from spmoe.session import open_session
from spmoe.strategy import MethodContext


class _Graph:
    """Stands in for torch.cuda.CUDAGraph; `log` gets ("begin" | "end" | "replay", graph index)."""

    log: ClassVar[list[tuple[str, int]]] = []
    count = 0

    def __init__(self):
        self.idx = _Graph.count
        _Graph.count += 1

    def capture_begin(self, pool=None, capture_error_mode="global"):
        _Graph.log.append(("begin", self.idx))

    def capture_end(self):
        _Graph.log.append(("end", self.idx))

    def replay(self):
        _Graph.log.append(("replay", self.idx))


def _spy_compute(monkeypatch) -> list[int]:
    """The layer of every `OffloadedExperts.compute` call from now on, in order."""
    computed = []
    original = OffloadedExperts.compute

    def spy(self, *args, **kwargs):
        computed.append(self.layer_idx)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OffloadedExperts, "compute", spy)
    return computed


@pytest.fixture(scope="module")
def lru_runtime():
    cfg = tiny_run_config("tiny", num_prompts=1)
    s = open_session(cfg)
    plan = s.plan(s.cfg.hardware, "lru_nosd")
    plan = replace(plan, num_slots=min(plan.num_slots, len(s.target.layout.keys) - 1))  # offloaded: starts empty
    runtime = get_strategy("lru_nosd").build(MethodContext(s.cfg, s.target, s.device, plan))
    yield s, runtime
    runtime.close()
    s.close()


@torch.inference_mode()
def test_segments_are_cut_at_every_experts_call(lru_runtime, monkeypatch):
    session, runtime = lru_runtime
    model, prompt = runtime.model, session.prompts[0].token_ids
    decoder = StaticDecoder(model, session.device)
    decoder.begin(len(prompt) + 8)
    decoder.forward(prompt, 1)
    num_layers = len(session.target.layout.moe_layers)
    inputs = torch.tensor(prompt[-2:] + [decoder.length])
    want = decoder.step(inputs, 2, 2).clone()  # [2, V]: the eager step at the same positions
    _Graph.log, _Graph.count = [], 0
    graph = PiecewiseGraph(decoder.step, prompt[-2:], decoder.length, 2, model, session.device, None,
                           graph_factory=_Graph)
    torch.testing.assert_close(graph.logits, want, rtol=0, atol=0)
    assert len(graph.graphs) == num_layers + 1 and len(graph.calls) == num_layers
    assert _Graph.log == [e for i in range(num_layers + 1) for e in (("begin", i), ("end", i), ("replay", i))]
    assert all(m.segment is None for m in model.modules() if isinstance(m, OffloadedExperts))

    computed = _spy_compute(monkeypatch)
    _Graph.log = []
    graph.replay(prompt[-2:], decoder.length)
    assert computed == list(session.target.layout.moe_layers)
    assert _Graph.log == [("replay", i) for i in range(num_layers + 1)]


@torch.inference_mode()
def test_a_dry_precapture_touches_neither_the_cache_nor_the_sequence_and_replays_for_real(lru_runtime, monkeypatch):
    """`PiecewiseGraph.precapture` (before any sequence): the same segments as a real capture, with the experts
    calls as zeros, so no expert is loaded, computed or recorded and no seam hook runs; it writes only the KV
    cache's last T positions; its replay then runs every layer's experts through the provider, in order."""
    session, runtime = lru_runtime
    model, prompt = runtime.model, session.prompts[0].token_ids
    decoder = StaticDecoder(model, session.device)
    decoder.begin(len(prompt) + 8)
    decoder.forward(prompt, 1)
    runtime.transfer.collect()
    runtime.events.take()
    keys = [layer.keys.clone() for layer in decoder.kv.layers]  # [1, H_kv, C, D] each
    held = [runtime.cache.key_at(s) for s in range(runtime.cache.num_slots)]
    experts = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    hooked = []
    handles = [on_experts_call(m, lambda h, i, w: hooked.append(1)) for m in experts]
    computed = _spy_compute(monkeypatch)
    _Graph.log, _Graph.count = [], 0
    try:
        graph = PiecewiseGraph.precapture(decoder.step, 2, 2, decoder.kv.capacity, model, session.device, None,
                                          graph_factory=_Graph)
    finally:
        for h in handles:
            h.remove()
    num_layers = len(session.target.layout.moe_layers)
    assert computed == [] and hooked == [] and runtime.events.take() == []
    assert runtime.transfer.collect().h2d_bytes == 0
    assert [runtime.cache.key_at(s) for s in range(runtime.cache.num_slots)] == held
    tail = decoder.kv.capacity - 2
    for before, layer in zip(keys, decoder.kv.layers):
        torch.testing.assert_close(layer.keys[:, :, :tail], before[:, :, :tail], rtol=0, atol=0)
        assert not torch.equal(layer.keys[:, :, tail:], before[:, :, tail:])
    assert len(graph.graphs) == num_layers + 1 and len(graph.calls) == num_layers
    assert all(m.segment is None for m in experts)
    _Graph.log = []
    graph.replay(prompt[-2:], decoder.length)
    assert computed == list(session.target.layout.moe_layers)
    assert _Graph.log == [("replay", i) for i in range(num_layers + 1)]


class _Stream:
    """Stands in for a CUDA stream: `log` gets ("wait", waiter, waited) for every wait_stream."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: "_Stream") -> None:
        self.log.append(("wait", self.name, other.name))


@torch.inference_mode()
def test_seam_hooks_run_on_the_ambient_stream_at_capture(lru_runtime, monkeypatch):
    """At capture the segments are captured on the side stream, while each call's seam hooks run on the ambient
    stream (never captured), after it waited for the side stream and before the side stream waits for them:
    a pinned buffer a hook hands to the prefetch worker is then never fenced on a stream that is capturing."""
    import spmoe.runtime.piecewise as piecewise

    session, runtime = lru_runtime
    model, prompt = runtime.model, session.prompts[0].token_ids
    decoder = StaticDecoder(model, session.device)
    decoder.begin(len(prompt) + 8)
    decoder.forward(prompt, 1)
    log: list = []
    ambient, side = _Stream("ambient", log), _Stream("side", log)
    current = [ambient]

    @contextmanager
    def on_stream(stream):
        before, current[0] = current[0], stream or current[0]
        try:
            yield
        finally:
            current[0] = before

    class Graph(_Graph):
        def capture_begin(self, pool=None, capture_error_mode="global"):
            log.append(("capture", current[0].name))

    monkeypatch.setattr(piecewise, "capture_streams", lambda device: (ambient, side))
    monkeypatch.setattr(piecewise, "on_stream", on_stream)
    experts = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    handles = [on_experts_call(m, lambda h, i, w: log.append(("hook", current[0].name))) for m in experts]
    try:
        PiecewiseGraph(decoder.step, prompt[-1:], decoder.length, 1, model, session.device, None, graph_factory=Graph)
    finally:
        for h in handles:
            h.remove()
    num_layers = len(session.target.layout.moe_layers)
    per_call = [("wait", "ambient", "side"), ("hook", "ambient"), ("wait", "side", "ambient"), ("capture", "side")]
    assert log == [("wait", "side", "ambient"), ("capture", "side"), *per_call * num_layers,
                   ("wait", "ambient", "side")]


def test_a_failed_capture_restores_the_experts(lru_runtime):
    session, runtime = lru_runtime

    def broken(inputs, num_tokens, num_logits):
        raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        PiecewiseGraph(broken, [1], 3, 1, runtime.model, session.device, None, graph_factory=_Graph)
    assert all(m.segment is None for m in runtime.model.modules() if isinstance(m, OffloadedExperts))


def test_which_forwards_graphs_may_capture(lru_runtime):
    """A resident cache's forward is safe whole; an offloaded one only with its experts left out; a hook
    anywhere (experts modules included) makes neither safe unless marked graph-safe; nothing is captured
    off CUDA."""
    session, lru = lru_runtime
    cpu = torch.device("cpu")
    assert not graph_safe(lru.model, cpu) and graph_safe(lru.model, cpu, experts_run_eagerly=True)
    for module in (lru.model.model.layers[1].self_attn, lru.model.model.layers[1].mlp.experts):
        handle = module.register_forward_pre_hook(lambda *a: None)
        assert not graph_safe(lru.model, cpu, experts_run_eagerly=True)
        handle.remove()
    handle = lru.model.model.layers[1].self_attn.register_forward_pre_hook(mark_graph_safe(lambda *a: None))
    assert graph_safe(lru.model, cpu, experts_run_eagerly=True)  # a graph-safe hook (routing replay's) is kept
    handle.remove()
    ctx = MethodContext(session.cfg, session.target, cpu, session.plan(session.cfg.hardware, "gpu_resident"))
    resident = get_strategy("gpu_resident").build(ctx)  # installs its own experts in the shared model
    try:
        assert graph_safe(resident.model, cpu)
        assert not capturable(resident.model, cpu) and not piecewise_capturable(resident.model, cpu)
    finally:
        resident.close()
