"""spmoe_plus's parts as pure components: sd_lookahead eviction on a hand-made access sequence
(exact hit / miss / eviction counts, worked out in the comments), the k chooser's decisions, and the
host planner's split."""

from __future__ import annotations

import threading

import torch

from spmoe.engine import StepState
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import make_policy
from spmoe.offload.eviction_lookahead import SdLookaheadPolicy
from spmoe.plus.host_experts import HostCost, HostPlanner
from spmoe.plus.k_chooser import KChooser


def _replay(policy, events) -> ExpertCache:
    cache = ExpertCache(2, 1, torch.float32, "cpu", policy)
    for ev in events:
        if ev[0] == "hint":
            if hasattr(policy, "predict"):
                policy.predict(*ev[1:])
        elif cache.lookup(ev) is None:
            cache.admit(ev)
    return cache


# Two MoE layers, 2 slots, discount 1 (= expected_reuse's frequencies). E[next use] = d + 2 (1/q - 1).
# 1. (0,0) miss, 2. (1,0) miss (free slots).
# 3. (0,1) miss; current layer 1: (0,0): d 0, q 2/3 -> 1; (1,0): d 1, q 2/3 -> 2: evict (1,0).
# 4. (1,0) miss; current 0: (0,0) and (0,1): d 1, q 1/2 -> 3 each; tie -> older visit: evict (0,0).
# hint: the coming verify step routes expert 1 at layer 0.
# 5. (0,2) miss; current 1: (0,1) predicted -> d = 0, (1,0): d 1, q 3/4 -> 1.67: evict (1,0).
#    expected_reuse: (0,1): d 0, q 1/2 -> 2 > 1.67: evicts (0,1), the expert about to be used.
# 6. (0,1): sd_lookahead hit; expected_reuse miss (and a 4th eviction).
EVENTS = [(0, 0), (1, 0), (0, 1), (1, 0), ("hint", 1, 0, [1]), (0, 2), (0, 1)]


def test_sd_lookahead_exact_counts_on_hand_made_sequence():
    ours = _replay(SdLookaheadPolicy([0, 1], discount=1.0), EVENTS)
    assert (ours.hits, ours.misses, ours.evictions) == (1, 5, 3)
    base = _replay(make_policy("expected_reuse", [0, 1]), EVENTS)
    assert (base.hits, base.misses, base.evictions) == (0, 6, 4)


def test_sd_lookahead_without_hints_is_expected_reuse_and_stale_hints_expire():
    seq = [(l, e) for e in (0, 1, 2, 0, 3, 1, 0) for l in (0, 1)]
    ours, base = _replay(SdLookaheadPolicy([0, 1], 1.0), seq), _replay(make_policy("expected_reuse", [0, 1]), seq)
    assert (ours.hits, ours.misses, ours.evictions) == (base.hits, base.misses, base.evictions)
    policy = SdLookaheadPolicy([0, 1])
    policy.predict(3, 1, [4])
    policy.touch((1, 2))  # verification passed layer 1: its prediction is consumed
    policy.predict(3, 1, [5])  # a late prediction for a layer already verified this step is ignored
    assert policy._predicted == {}
    policy.predict(4, 0, [6])
    policy.predict(3, 0, [7])  # an older step's prediction does not replace the newer one
    assert policy._predicted == {0: {6}}


def _chooser(accept: float, miss_ms: float, **kw) -> KChooser:
    kw = {"warmup_steps": 0, "explore_every": 0, **kw}
    c = KChooser(k_min=0, num_layers=4, num_experts=8, top_k=2, miss_ms=miss_ms, accept_prior=accept, **kw)
    c.draft_ms = 1.0
    c.observe_verify(0, 10.0)  # one verification without misses: c = 10 ms
    return c


def test_k_chooser_drafts_when_cheap_and_stops_when_the_union_costs_more():
    # cheap misses, high acceptance: E/T = (1 + .9 + .81 + .73) / 13 = 0.264 at k = 3 beats 1 / 10 at k = 0
    assert _chooser(0.9, 0.0).best_k(3) == 3
    # union u(1) = 2, u(2) = 8 (1 - 0.75^2) = 3.5; m = 1, b = 10 ms per missing expert:
    # k = 0: 1 / (10 + 4 * 2 * 10) = 0.0111; k = 1 at a = 0.3: 1.3 / (1 + 10 + 4 * 3.5 * 10) = 0.0086
    c = _chooser(0.3, 10.0)
    assert abs(c.union_size(2) - 3.5) < 1e-9
    assert c.best_k(3) == 0
    assert _chooser(0.9, 10.0).best_k(1) == 1  # 1.9 / 151 = 0.0126 > 0.0111


def test_k_chooser_fits_verify_cost_and_prefers_measured_step_times():
    c = _chooser(0.9, 10.0)
    for x, y in [(0, 10.0), (10, 40.0), (20, 70.0)] * 20:  # verify = 10 + 3 x
        c.observe_verify(x, y)
    fit = c.verify_fit()
    assert abs(fit[0] - 10.0) < 0.5 and abs(fit[1] - 3.0) < 0.05
    c.step_ms, c.samples = {1: 1000.0}, {1: 5}  # k = 1 measured slow: untried k scale by the same ratio
    assert c.expected_step_ms(1) == 1000.0
    assert abs(c.expected_step_ms(0) / c.expected_step_ms(1) - c.model_step_ms(0) / c.model_step_ms(1)) < 1e-9


def test_k_chooser_bounds_learning_warmup_and_exploration():
    c = _chooser(0.3, 10.0, warmup_steps=2, explore_every=4)
    picks = [c(StepState(step=i + 1, pos=10 + i, max_k=3)) for i in range(3)]
    assert picks == [3, 3, 0]  # warm-up drafts max_k, then the model
    c.samples = {0: 1, 3: 2, 2: 1}
    assert c(StepState(step=4, pos=13, max_k=3)) == 1  # every 4th step runs the least-measured k
    c = _chooser(0.9, 0.0)
    assert c(StepState(1, 10, max_k=2)) == 2
    c(StepState(2, 13, max_k=2))  # both drafts accepted: 2 successes in 2 trials
    assert c.acceptance > 0.9
    c(StepState(3, 14, max_k=2))  # none accepted: 0 successes in 1 trial
    assert c.acceptance < 0.9
    assert all(0 <= k <= 2 for k in c.chosen)
    c.k_min = 2
    assert _chooser(0.0, 10.0).best_k(1) == 0 and c.best_k(3) >= 2
    c.union[2] = 2.0  # measured: routes of the two positions coincide
    assert c.union_size(2) == 2.0 and c.union_size(3) < 8 * (1 - 0.75 ** 3)


def _simulate(accept_all: bool, steps: int = 40) -> list[int]:
    """A decode loop with known costs: draft 60 ms per token, verify 200 ms + 5 ms per missing expert,
    32 layers, unions u(1) = 2, u(2) = 3, half missing. k = 1 emits 2 tokens when accepted:
    E/T = 2 / (60 + 200 + 5 * 48) = 0.0040 > 1 / (200 + 5 * 32) = 0.0028; when always rejected k = 0 wins."""
    now = [0.0]
    c = KChooser(k_min=0, num_layers=32, num_experts=8, top_k=2, miss_ms=6.0, accept_prior=0.8,
                 clock=lambda: now[0])
    pos = 10
    c.begin_step(0)
    c.end_step()
    for step in range(1, steps + 1):
        k = c(StepState(step, pos, max_k=1))
        c.begin_step(step)
        now[0] += 0.060 * k
        unique = {0: 2, 1: 3}[k]
        for layer in range(32):
            c.on_layer(layer, k + 1, unique, unique // 2 + (layer % 2) * (unique % 2))
        now[0] += (200 + 5 * (32 * unique // 2)) / 1e3
        c.end_step()
        pos += 1 + (k if accept_all else 0)
    return c.chosen


def test_k_chooser_converges_to_the_better_k_on_a_simulated_loop():
    tail = _simulate(accept_all=True)[10:]
    assert sum(k == 1 for k in tail) >= 0.9 * len(tail)
    tail = _simulate(accept_all=False)[10:]
    assert sum(k == 0 for k in tail) >= 0.8 * len(tail)


class _Provider:
    def __init__(self, resident, in_flight):
        self.cache = ExpertCache(8, 1, torch.float32, "cpu", make_policy("lru"))
        for key in resident:
            self.cache.preload(key)
        self.lock = threading.RLock()
        self._in_flight = in_flight

    def num_in_flight(self) -> int:
        return self._in_flight


def test_host_planner_balances_host_against_the_copy_queue():
    cost = HostCost(fixed_ms=4.0, per_token_ms=1.0, copy_ms=6.0)
    tokens = {0: 1, 1: 2, 2: 1, 3: 1}  # expert 3 is resident
    # empty queue: expert 1 (2 tokens) first: host 6 vs GPU 6 -> GPU (ties stay on the link);
    # expert 0: host 5 < GPU 12 -> host; expert 2: host 5 + 5 = 10 < GPU 12 -> host
    planner = HostPlanner(_Provider([(0, 3)], 0), "auto", cost, None)
    assert planner.split(0, tokens) == [0, 2]
    # two prefetch copies ahead: every missing expert finishes sooner on the host until it is busy
    assert HostPlanner(_Provider([(0, 3)], 2), "auto", cost, None).split(0, tokens) == [1, 0, 2]
    assert HostPlanner(_Provider([(0, 3)], 2), "auto", cost, 1).split(0, tokens) == [1]
    assert HostPlanner(_Provider([(0, 3)], 0), "all", None, None).split(0, tokens) == [1, 0, 2]
    assert HostPlanner(_Provider([], 0), "off", None, None).split(0, tokens) == []


def test_host_planner_learns_the_in_run_host_time():
    cost = HostCost(fixed_ms=4.0, per_token_ms=1.0, copy_ms=6.0)
    planner = HostPlanner(_Provider([], 0), "auto", cost, None, ema=0.1)
    planner.observe(20.0, [1, 1])  # 10 ms per expert of one token: fixed part 9 ms
    assert abs(cost.fixed_ms - (0.9 * 4.0 + 0.1 * 9.0)) < 1e-12
    for _ in range(200):
        planner.observe(20.0, [1, 1])
    assert planner.split(0, {0: 1, 1: 1}) == [1]  # host 10 ms: the first miss copies (6), the second computes
