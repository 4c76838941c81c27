"""AdapMoE: lossless with gating off, fewer experts (and a reported token agreement) with gating on,
the gate-lookahead prefetch, the DP cache sizing against brute force, and the gating rule itself."""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from dataclasses import dataclass, replace

import pytest
import torch

import baselines.adapmoe  # noqa: F401  (registers the two strategies)
from baselines.adapmoe import lookahead_depths
from conftest import tiny_reference_session
from spmoe.summary import summarize_run
from spmoe.config import MethodConfig, SpecConfig
from spmoe.policy.cache_sizing import choose_sizes, lru_hit_curve, spread_leftover, total_value
from spmoe.predict.adaptive_gating import DEFAULT_THRESHOLD, AdaptiveGating, gate_routes
from spmoe.predict.capture import router_of
from spmoe.methods import STRATEGIES
from spmoe.strategy import MethodContext

TOKENS = 12
K = 3  # draft tokens per verify step for the SD variant
SLOTS = 6  # tiny: 4 MoE layers x 8 experts, so 1-3 slots per layer
ON_THRESHOLD = 0.55  # tiny random routers are flat (top-1 normalized weight ~0.5-0.6): drop some, not all
VARIANTS = ["adapmoe", "adapmoe_nosd"]


@dataclass
class Run:
    tokens: list[list[int]]
    gens: list
    summary: dict
    runtime: object


@pytest.fixture(scope="module")
def session():
    s = tiny_reference_session("tiny", "tiny", 2, TOKENS)
    s.runs = {}
    yield s
    s.close()


def _method(name: str, gating: bool | None, threshold: float | None = None, num_slots: int | None = SLOTS,
            worker: bool = False) -> MethodConfig:
    method = MethodConfig(name=name, num_slots=num_slots, worker_thread=worker)
    if gating is not None:  # MethodConfig has no gating fields yet: the strategy reads them with getattr
        method.adaptive_gating = gating
    if threshold is not None:
        method.gating_threshold = threshold
    return method


def _run(s, name: str, gating: bool, threshold: float | None = None, num_slots: int = SLOTS,
         worker: bool = False) -> Run:
    key = (name, gating, threshold, num_slots, worker)
    if key not in s.runs:
        method = _method(name, gating, threshold, num_slots, worker)
        spec, built = STRATEGIES[name], []
        build = spec.build
        spec.build = lambda ctx: built.append(build(ctx)) or built[-1]  # keep the runtime for its stats
        try:
            gens, plan, peak = s.generate(method, s.cfg.hardware, TOKENS, spec_cfg=SpecConfig(num_draft_tokens=K))
        finally:
            spec.build = build
        summary = summarize_run(s, method, s.cfg.hardware, gens, plan, peak, s.reference,
                                SpecConfig(num_draft_tokens=K))
        s.runs[key] = Run([g.token_ids for g in gens], gens, summary, built[0])
    return s.runs[key]


def _layer_events(run: Run):
    return [ev for g in run.gens for r in g.records if r.phase == "decode" for ev in r.layers]


# -- (a) gating off: greedy tokens identical to gpu_resident ---------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_gating_off_matches_gpu_resident(session, name):
    run = _run(session, name, gating=False)
    layout = session.target.layout
    assert run.tokens == session.reference
    assert run.summary["lossless"] is True and run.summary["token_agreement"] == 1.0
    assert run.runtime.gating.stats()["gating_routed"] == 0  # off: the hooks are not even installed
    sizes = run.runtime.slots_per_layer
    assert set(sizes) == set(layout.moe_layers) and min(sizes.values()) >= 1 and sum(sizes.values()) == SLOTS
    assert run.summary["num_slots"] == SLOTS
    assert run.summary["expert_misses"] > 0  # small caches: it had to load on demand
    if not STRATEGIES[name].speculative:
        assert all(len(ev.needed) == layout.top_k for ev in _layer_events(run))


def test_fewer_slots_than_layers_fall_back_to_one_shared_cache(session):
    run = _run(session, "adapmoe_nosd", gating=False, num_slots=2, worker=True)
    assert run.runtime.slots_per_layer is None
    assert run.tokens == session.reference


# -- (b) gating on: experts dropped, fewer loaded, agreement reported ------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_gating_drops_experts_and_loads_fewer(session, name):
    off = _run(session, name, gating=False)
    on = _run(session, name, gating=True, threshold=ON_THRESHOLD)
    stats = on.runtime.gating.stats()
    assert stats["gating_dropped"] > 0 and stats["gating_tokens_gated"] == stats["gating_dropped"]  # top-2: one each
    assert 0 < stats["gating_drop_rate"] < 0.5  # some tokens keep both experts
    assert on.summary["unique_experts_per_layer_step"] < off.summary["unique_experts_per_layer_step"]
    top_k = session.target.layout.top_k
    if not STRATEGIES[name].speculative:  # one token per step: the experts a token needs, directly
        sizes = [len(ev.needed) for ev in _layer_events(on)]
        assert max(sizes) == top_k and min(sizes) == 1
    # the output may differ from the reference: the run reports whether and how much
    assert on.summary["lossless"] == (on.tokens == session.reference)
    assert 0.0 < on.summary["token_agreement"] <= 1.0
    assert all(len(t) == TOKENS for t in on.tokens)


def test_gating_is_on_by_default_with_the_documented_threshold(session):
    for name in VARIANTS:
        method = _method(name, gating=None)
        ctx = MethodContext(replace(session.cfg, method=method), session.target, session.device,
                            session.plan(session.cfg.hardware, name), session.draft)
        runtime = STRATEGIES[name].build(ctx)
        try:
            assert runtime.gating.enabled and set(runtime.gating.thresholds.values()) == {DEFAULT_THRESHOLD}
        finally:
            runtime.close()


def test_router_hook_drops_only_while_active(session):
    model, layout = session.target.model, session.target.layout
    layer = layout.moe_layers[1]
    router = router_of(model, layer)
    hidden = torch.randn(5, layout.hidden_size, generator=torch.Generator().manual_seed(0))
    logits, weights, index = router(hidden)
    gating = AdaptiveGating(model, layout.moe_layers, layout.num_experts, threshold=0.5)  # top-2: always drop
    try:
        out = router(hidden)  # not in a step (e.g. prefill): untouched
        assert torch.equal(out[1], weights) and torch.equal(out[2], index)
        gating.begin_step(1)
        _, w, i = router(hidden)
        assert torch.equal(i[:, 0], index[:, 0]) and (i[:, 1] == layout.num_experts).all()
        assert torch.allclose(w[:, 0], torch.ones(5)) and (w[:, 1] == 0).all()
        assert gating.stats()["gating_dropped"] == 0  # counted where the routes reach the experts
        model.model.layers[layer].mlp.experts.run_seam_hooks(hidden, i, w)
        assert gating.stats()["gating_dropped"] == 5 and gating.stats()["gating_tokens_gated"] == 5
        gating.end_step()
        assert torch.equal(router(hidden)[2], index)
    finally:
        gating.remove()
    assert torch.equal(router(hidden)[2], index)


def test_counters_are_device_work_that_a_whole_graph_captures(session, monkeypatch):
    """The counting seam hook is graph-safe (device counters, no host sync): it counts while active and, like the
    gating, while captured (faked here) whatever `active` says; never while gating is off."""
    import spmoe.predict.adaptive_gating as gating_mod
    from spmoe.hooks import is_graph_safe

    model, layout = session.target.model, session.target.layout
    experts = model.model.layers[layout.moe_layers[0]].mlp.experts
    hidden = torch.zeros(3, layout.hidden_size)
    index = torch.tensor([[0, layout.num_experts], [1, 2], [3, layout.num_experts]])  # [T, A]: 2 dropped routes
    for enabled in (True, False):
        gating = AdaptiveGating(model, layout.moe_layers, layout.num_experts, enabled=enabled)
        try:
            gating.count_calls()
            assert all(is_graph_safe(h) for h in experts.seam_hooks)
            experts.run_seam_hooks(hidden, index, torch.ones(3, 2))  # inactive, not capturing: not counted
            monkeypatch.setattr(gating_mod, "capturing", lambda device: True)
            experts.run_seam_hooks(hidden, index, torch.ones(3, 2))
            monkeypatch.setattr(gating_mod, "capturing", lambda device: False)
            want = (6, 2, 2) if enabled else (0, 0, 0)
            stats = gating.stats()
            assert (stats["gating_routed"], stats["gating_dropped"], stats["gating_tokens_gated"]) == want
        finally:
            gating.remove()
        assert not experts.seam_hooks


def test_gate_routes_rule():
    E = 8
    weights = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.05, 0.95], [0.45, 0.05]])  # last: unnormalized
    index = torch.tensor([[3, 5], [1, 2], [4, 6], [7, 0], [2, 3]])
    w, i, keep = gate_routes(weights, index, 0.85, E)
    assert i.tolist() == [[3, E], [1, 2], [4, 6], [E, 0], [2, E]]
    assert torch.allclose(w, torch.tensor([[1.0, 0.0], [0.6, 0.4], [0.2, 0.8], [0.0, 1.0], [0.5, 0.0]]))
    assert keep.sum().item() == 7
    # top-4: keep the shortest prefix (by weight) whose normalized mass reaches the threshold
    w, i, _ = gate_routes(torch.tensor([[0.3, 0.5, 0.05, 0.15]]), torch.tensor([[0, 1, 2, 3]]), 0.75, E)
    assert i.tolist() == [[0, 1, E, E]]
    assert torch.allclose(w, torch.tensor([[0.375, 0.625, 0.0, 0.0]]))


# -- (c) DP cache sizing: the exact optimum ---------------------------------------------------------

def _brute_force(curves, budget, min_slots=1):
    ranges = [range(min_slots, max(min_slots, len(c)) + 1) for c in curves]
    feasible = (sizes for sizes in itertools.product(*ranges) if sum(sizes) <= budget)
    return max(total_value(curves, sizes) for sizes in feasible)


def test_dp_hand_made_example():
    # layer 0 saturates at 2 slots, layer 1 only pays off at 3 (non-concave), layer 2 is flat
    curves = [[5, 9, 9, 9], [0, 1, 12, 13], [4, 4, 4, 4]]
    assert choose_sizes(curves, 6) == [2, 3, 1]  # 9 + 12 + 4 = 25
    assert choose_sizes(curves, 5) == [1, 3, 1]  # 5 + 12 + 4 = 21 beats 9 + 1 + 4 = 14
    assert choose_sizes(curves, 3) == [1, 1, 1]
    assert spread_leftover([2, 3, 1], 10, [4, 4, 4]) == [4, 4, 2]
    with pytest.raises(ValueError, match="cannot give"):
        choose_sizes(curves, 2)


@pytest.mark.parametrize("seed", range(30))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    num_layers, max_slots = rng.randint(1, 4), rng.randint(1, 5)
    curves = []
    for _ in range(num_layers):
        length = rng.randint(1, max_slots)
        steps = [rng.randint(0, 6) for _ in range(length)]
        curves.append(list(itertools.accumulate(steps)) if rng.random() < 0.7 else steps)  # monotone or arbitrary
    min_slots = rng.choice([1, 1, 2])
    budget = rng.randint(num_layers * min_slots, num_layers * max_slots + 2)
    sizes = choose_sizes(curves, budget, min_slots)
    assert sum(sizes) <= budget and min(sizes) >= min_slots
    assert total_value(curves, sizes) == _brute_force(curves, budget, min_slots)


def _naive_lru_hits(steps, slots):
    cache, hits = OrderedDict(), 0
    for step in steps:
        for key in dict.fromkeys(step):
            if key in cache:
                hits += 1
                cache.move_to_end(key)
            else:
                if len(cache) == slots:
                    cache.popitem(last=False)
                cache[key] = True
    return hits


@pytest.mark.parametrize("seed", range(5))
def test_lru_hit_curve_is_an_lru_simulation_of_every_size(seed):
    rng = random.Random(seed)
    steps = [[rng.choice([0, 0, 1, 1, 2, 3, 4, 5, 6, 7]) for _ in range(rng.randint(1, 3))] for _ in range(60)]
    curve = lru_hit_curve(steps, 8)
    assert curve == [_naive_lru_hits(steps, s) for s in range(1, 9)]
    assert lru_hit_curve([[0], [1], [0], [1], [2], [0]], 3) == [0, 2, 3]


# -- (d) adaptive lookahead prefetch ----------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_lookahead_prefetches(session, name):
    run = _run(session, name, gating=False)
    layout = session.target.layout
    assert run.summary["prefetch_hits"] > 0
    assert run.summary["prefetches_issued"] > 0
    depths = run.runtime.lookahead_depths
    assert set(depths) == set(layout.moe_layers) and all(1 <= d <= baselines.adapmoe.MAX_LOOKAHEAD
                                                         for d in depths.values())
    predicted = {ev.layer for ev in _layer_events(run) if ev.predicted is not None}
    assert predicted and predicted <= set(layout.moe_layers[1:])  # nothing precedes the first MoE layer


def test_lookahead_depth_rule():
    recall = {(0, 1): 0.3, (0, 2): 0.9, (0, 3): 0.9,  # d=1 is always used, even when unreliable
              (1, 1): 0.9, (1, 2): 0.5, (1, 3): 0.95,  # stops at the first unreliable distance
              (2, 1): 0.9, (2, 2): 0.7}  # layer 2 has only two layers ahead
    assert lookahead_depths(recall, [0, 1, 2, 3], max_depth=3, min_recall=0.6) == {0: 3, 1: 1, 2: 2, 3: 1}
