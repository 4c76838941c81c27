"""SP-MoE's draft-side predictor under CUDA graphs, emulated on the CPU: when every draft forward runs as
a graph (its hooks doing only device work into the static buffer, `spmoe.hooks.building`) and the
predictions are submitted after it (`DraftRouterPredictor.after_draft_forward(True)`), the run makes the
same predictions, prefetches and expert events as with the predictions submitted inline by an eager
forward, and its hooks no longer keep the draft from being captured."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import tiny_run_config

from experiments.presets import load_preset
from spmoe.config import CutoffConfig, MethodConfig, SpecConfig, TwinConfig
from spmoe.hooks import building
from spmoe.runtime.graphs import graph_safe
from spmoe.session import open_session
from spmoe.spec.drafter import ModelDrafter


@pytest.fixture(scope="module")
def twin():
    cfg = tiny_run_config("tiny", num_prompts=2, max_new_tokens=16)
    cfg.model.weights = "twin"
    cfg.model.twin = TwinConfig(expert_noise=0.05)
    cfg.draft = load_preset("draft", "tiny")
    s = open_session(cfg)
    yield s
    s.close()


def _run(s, name: str, k: int):
    method = MethodConfig(name=name, num_slots=10, worker_thread=False, cutoff=CutoffConfig(mode="all"))
    gens, _, _ = s.generate(method, s.cfg.hardware, 16, spec_cfg=SpecConfig(num_draft_tokens=k))
    events = [[(ev.layer, ev.needed, ev.hits, ev.misses, ev.prefetch_hits, ev.predicted) for ev in r.layers]
              for g in gens for r in g.records]
    return [g.token_ids for g in gens], events


def _as_graph_replays(monkeypatch):
    def feed(self, ids):
        with building():  # the hooks record device work only, as in a capture
            logits = self.decoder.forward(ids, 1)[-1]
        for listener in self.on_forward:
            listener(True)  # ... and the host work follows the "replay"
        return logits

    monkeypatch.setattr(ModelDrafter, "_feed", feed)


@pytest.mark.parametrize("name,k", [("spmoe", 1), ("spmoe", 3), ("spmoe_plus", 2)])
def test_predictions_after_a_graph_replay_equal_those_of_an_eager_forward(twin, monkeypatch, name, k):
    eager = _run(twin, name, k)
    assert any(ev[5] for step in eager[1] for ev in step)  # the predictor predicted
    _as_graph_replays(monkeypatch)
    graphed = _run(twin, name, k)
    if name == "spmoe_plus":  # its host/GPU expert split follows measured timings: compare the predictions
        eager = eager[0], [[ev[5] for ev in step] for step in eager[1]]
        graphed = graphed[0], [[ev[5] for ev in step] for step in graphed[1]]
    assert graphed == eager


def test_the_predictor_hooks_leave_the_draft_capturable(twin):
    from spmoe.methods import get_strategy
    from spmoe.strategy import MethodContext

    s = twin
    method = MethodConfig(name="spmoe", num_slots=10, cutoff=CutoffConfig(mode="all"))
    plan, drafts, _ = s._run_plan(s.cfg.hardware, method, None)
    ctx = MethodContext(replace(s.cfg, method=method), s.target, s.device, plan, s.draft if drafts else None)
    runtime = get_strategy("spmoe").build(ctx)
    try:
        assert any(m._forward_hooks or m._forward_pre_hooks for m in s.draft.modules())
        assert graph_safe(s.draft, s.device)
        assert runtime.draft_listeners
    finally:
        runtime.close()
