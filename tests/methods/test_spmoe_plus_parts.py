"""spmoe_plus's parts as pure components: sd_lookahead eviction on a hand-made access sequence
(exact hit / miss / eviction counts, worked out in the comments), the k chooser's decisions, and the
host planner's split."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from spmoe.engine import StepState
from spmoe.models.experts import ExpertLayout, OffloadedExperts
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import make_policy
from spmoe.offload.eviction_lookahead import SdLookaheadPolicy
from spmoe.plus.host_experts import HostAssistedExperts, HostCost, HostPlanner, HostStats
from spmoe.plus.host_gate import GateHistory, HostGate
from spmoe.plus.k_chooser import KChooser
from spmoe.trace.records import ExpertEventLog


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


def test_host_reuse_credits_a_load_with_the_residency_it_buys():
    cost = HostCost(fixed_ms=4.0, per_token_ms=1.0, copy_ms=6.0)
    tokens = {e: 1 for e in range(6)}  # experts 3, 4, 5 resident: r = 0.5, credit 3 ms
    resident = [(0, 3), (0, 4), (0, 5)]
    assert HostPlanner(_Provider(resident, 0), "auto", cost, None).split(0, tokens) == [0, 2]  # no credit: host 5 < 6
    planner = HostPlanner(_Provider(resident, 0), "auto", cost, None, ema=0.5, reuse=True)
    # e0: host 5 vs GPU 6 - 3 -> GPU; e1: host 5 < 12 - 3 -> host; e2: host 10 vs 12 - 3 -> GPU
    assert planner.split(0, tokens) == [1] and planner.resident_rate == 0.5
    # a call with nothing resident: r = 0.5 x 0.5 + 0.5 x 0 = 0.25, credit 1.5: e0 GPU (5 > 4.5), e1 host, e2 host
    assert planner.split(0, {0: 1, 1: 1, 2: 1}) == [1, 2] and planner.resident_rate == 0.25
    # a cache that holds most of what is routed (r = 5/6, credit 5): no host expert unless copies queue
    most = [(0, e) for e in range(1, 6)]
    assert HostPlanner(_Provider(most, 0), "auto", cost, None, reuse=True).split(0, tokens) == []
    assert HostPlanner(_Provider(most, 2), "auto", cost, None, reuse=True).split(0, tokens) == [0]  # 5 < 18 - 5


def test_host_times_follow_in_run_measurements():
    cost = HostCost(fixed_ms=4.0, per_token_ms=1.0, copy_ms=6.0)
    planner = HostPlanner(_Provider([], 0), "auto", cost, None, ema=0.5)
    times = planner.times
    assert times.expert_ms(2) == 6.0 and times.start_ms is None  # the profiled line before any observation
    planner.observe(0.0, [(1, 10.0)])  # the first observation at a count is taken as it is
    assert times.expert_ms(1) == 10.0
    assert times.expert_ms(2) == 12.0  # unobserved: profiled 6 x (10 / 5), the nearest observed count's ratio
    planner.observe(0.0, [(1, 20.0), (3, 7.0)])  # EWMA at n = 1: 0.5 x 10 + 0.5 x 20
    assert times.expert_ms(1) == 15.0 and times.expert_ms(3) == 7.0
    assert times.expert_ms(2) == 6.0 * 15.0 / 5.0  # equidistant from 1 and 3: the smaller count's ratio
    assert times.expert_ms(4) == 8.0 * 7.0 / 7.0
    assert cost.fixed_ms == 4.0  # the profile stays as measured (reported as such)


def test_host_planner_schedules_the_host_queue_with_in_run_times():
    cost = HostCost(fixed_ms=4.0, per_token_ms=1.0, copy_ms=6.0)
    tokens = {0: 1, 1: 1, 2: 1}
    planner = HostPlanner(_Provider([], 0), "auto", cost, None, ema=0.5)
    # GPU finish = (queued copies + GPU experts so far + 1) x 6; host finish = start + host experts so far x ms.
    # profiled 5 ms: e0 host 5 < GPU 6 -> host; e1 host 10 > GPU 6 -> GPU; e2 host 10 < GPU 12 -> host
    assert planner.split(0, tokens) == [0, 2]
    planner.observe(0.0, [(1, 8.0)])  # in-run 8 ms: e0 8 > 6 -> GPU; e1 8 < 12 -> host; e2 16 > 12 -> GPU
    assert planner.split(0, tokens) == [1]
    planner.observe(10.0, [])  # start delay EWMA 0.5 x 0 + 0.5 x 10 = 5 ms: e0 13 > 6; e1 13 > 12; e2 13 < 18 -> host
    assert planner.split(0, tokens) == [2]
    queued = HostPlanner(_Provider([], 2), "auto", cost, None)  # two copies ahead: the first GPU expert at 18
    queued.observe(3.0, [(1, 8.0)])  # e0 host 11 < 18 -> host; e1 host 19 > 18 -> GPU; e2 host 19 < 24 -> host
    assert queued.split(0, tokens) == [0, 2]
    # a demand copy moving a quarter of the bytes (int4 lossy misses) at layer 1: GPU 1.5, 3, 4.5 ms < host 5
    lossy = HostPlanner(_Provider([], 0), "auto", cost, None, copy_fraction=lambda layer: 0.25 if layer == 1 else 1.0)
    assert lossy.split(1, tokens) == [] and lossy.split(0, tokens) == [0, 2]
    # a queued prefetch copy moves a whole expert (6 ms): GPU 7.5, 9, 10.5 at layer 1; host 5 -> e0 host, then 10 > 7.5
    queued = HostPlanner(_Provider([], 1), "auto", cost, None, copy_fraction=lambda layer: 0.25)
    assert queued.split(1, tokens) == [0]


def _lossy_setup(precision: str):
    from spmoe.models.experts import ExpertLayout
    from spmoe.offload.store import ExpertStore
    from spmoe.offload.transfer import TransferEngine
    from spmoe.plus.lossy_misses import LossyMissTransfer, LowPrecisionExperts

    layout = ExpertLayout((0, 1), 4, 2, 64, 40, torch.float32)  # H = 64, I = 40: int4 groups of 16 pad 40 to 42
    store = ExpertStore(layout, pin=False)
    store.fill_random(0, 0.1, torch.device("cpu"))
    lowp = LowPrecisionExperts(store, [1], precision, 16, torch.device("cpu"))
    transfer = LossyMissTransfer(TransferEngine(torch.device("cpu"), 3), store, lowp, torch.device("cpu"))
    return layout, store, transfer


def test_lossy_miss_moves_exactly_the_quantized_bytes_and_dequantizes_as_the_draft_quantizers():
    from spmoe.models import int4
    from spmoe.models.quantized_draft import quantize_rows

    h, inter = 64, 40
    expected_bytes = {"int8": 3 * inter * h + (2 * inter + h) * 4,  # int8 values + a float32 scale per row
                      "int4": int4.int4_bytes(2 * inter, h, 16, 4) + int4.int4_bytes(h, inter, 16, 4)}
    assert expected_bytes["int4"] == 80 * (4 * 16 // 2 + 2 * 4 * 4) + 64 * (3 * 14 // 2 + 2 * 3 * 4)
    for precision, nbytes in expected_bytes.items():
        layout, store, transfer = _lossy_setup(precision)
        assert transfer.lowp.bytes_per_expert == nbytes
        slots = torch.zeros(3, layout.expert_numel)  # [S, N]
        transfer.load(0, slots[0], store.flat((1, 2)))  # layer 1 is lossy
        assert transfer.collect().h2d_bytes == nbytes
        for got, w in zip(layout.split(slots[0]), layout.split(store.flat((1, 2)))):
            if precision == "int8":
                q, s = quantize_rows(w)
                want = q.to(w.dtype) * s[:, None]
            else:
                want = int4.dequantize(*int4.quantize(w, 16), w.shape[1], w.dtype)
            assert torch.equal(got, want) and not torch.equal(got, w)
        transfer.load(1, slots[1], store.flat((0, 2)))  # layer 0 (up to the cutoff) stays exact
        assert transfer.collect().h2d_bytes == layout.expert_bytes and torch.equal(slots[1], store.flat((0, 2)))


def test_lossy_slot_bookkeeping_counts_reuse_until_an_exact_load_replaces_it():
    layout, store, transfer = _lossy_setup("int8")
    slot = torch.empty(layout.expert_numel)
    transfer.load(2, slot, store.flat((1, 0)))
    transfer.wait_ready(2)  # the miss's own computation
    transfer.wait_ready(2)  # a later hit reuses the lossy copy: accepted and counted
    transfer.wait_ready(0)  # another slot: exact
    assert transfer.lossy_slots == {2}
    transfer.load(2, slot, store.flat((1, 1)), prefetch=True)  # a prefetch of a lossy layer is exact
    transfer.wait_ready(2)
    assert transfer.lossy_slots == set() and torch.equal(slot, store.flat((1, 1)))
    stats = transfer.stats
    assert (stats.num_lossy_loads, stats.lossy_load_bytes, stats.num_lossy_computes) == (
        1, transfer.lowp.bytes_per_expert, 2)
    assert transfer.collect().h2d_bytes == transfer.lowp.bytes_per_expert + layout.expert_bytes


def test_lossy_copy_is_refused_when_the_host_cannot_hold_it():
    from spmoe.models.experts import ExpertLayout
    from spmoe.offload.host_memory import HostMemoryError
    from spmoe.offload.store import ExpertStore
    from spmoe.plus.lossy_misses import HOST_MARGIN_BYTES, LowPrecisionExperts

    store = ExpertStore(ExpertLayout((0, 1), 4, 2, 64, 40, torch.float32), pin=False)
    with pytest.raises(HostMemoryError, match="lossy misses"):
        LowPrecisionExperts(store, [1], "int8", 16, torch.device("cpu"), host_memory_gib=HOST_MARGIN_BYTES / 2**30)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_lossy_misses_dequantize_on_the_copy_stream(gpu, precision):
    """Two slots, eight lossy loads through one staging buffer: each load overwrites a slot a
    compute-stream read used moments before and refills the staging buffer the previous dequantization
    read; the slots must hold exactly the host-side dequantization."""
    from spmoe.models.experts import ExpertLayout
    from spmoe.offload.store import ExpertStore
    from spmoe.offload.transfer import TransferEngine
    from spmoe.plus.lossy_misses import (
        LossyMissTransfer,
        LowPrecisionExperts,
        dequantize_into,
    )

    layout = ExpertLayout((0, 1), 6, 2, 512, 1024, torch.bfloat16)
    store = ExpertStore(layout, pin=True)
    store.fill_random(0, 0.02, gpu)
    transfer = LossyMissTransfer(TransferEngine(gpu, 2), store, LowPrecisionExperts(store, [1], precision, 128, gpu), gpu)
    slots = torch.empty(2, layout.expert_numel, dtype=layout.dtype, device=gpu)  # [S, N]
    experts, outs = [0, 1, 2, 3, 4, 5, 0, 1], []
    try:
        for i, e in enumerate(experts):
            transfer.load(i % 2, slots[i % 2], store.flat((1, e)))
            transfer.wait_ready(i % 2)
            outs.append(slots[i % 2] * 1)  # a compute-stream read of the slot
            transfer.release(i % 2)
        torch.cuda.synchronize(gpu)
        for e, got in zip(experts, outs):
            want = torch.empty(layout.expert_numel, dtype=layout.dtype)  # [N]
            dequantize_into(transfer.lowp.flat((1, e)), want, layout, precision, 128)
            assert torch.equal(got.cpu(), want)
        assert transfer.stats.num_lossy_computes == 8
        assert transfer.collect().h2d_bytes == 8 * transfer.lowp.bytes_per_expert
    finally:
        transfer.close()
        store.close()


def test_a_layer_without_host_experts_runs_the_base_experts_path(monkeypatch):
    """A layer call whose planner keeps every expert on the device is served as `OffloadedExperts` serves it, with
    the call site (so, under piecewise decode, its call-site graph), from the routes already on the host."""
    calls, provided = [], []
    monkeypatch.setattr(OffloadedExperts, "_serve", lambda *a: pytest.fail("the routes were read twice"))
    monkeypatch.setattr(OffloadedExperts, "_provide", lambda self, h, ids, index_cpu: provided.append(ids) or "served")
    monkeypatch.setattr(OffloadedExperts, "_kernels", lambda self, h: True)
    monkeypatch.setattr(OffloadedExperts, "_graphed_served",
                        lambda self, h, i, w, site, index_cpu, served: calls.append(site) or h)

    class Planner:
        allowed = True

        def __init__(self, host):
            self.host = host

        def split(self, layer, tokens):
            return self.host

    base = OffloadedExperts(0, ExpertLayout((0,), 4, 2, 8, 4, torch.float32), torch.nn.SiLU(), provider=None)
    experts = HostAssistedExperts(base, Planner([]), store=None, pool=None, stats=HostStats())
    h, index = torch.zeros(1, 8), torch.tensor([[0, 2]])
    assert experts.compute(h, index, torch.ones(1, 2), site="site") is h
    assert calls == ["site"] and experts.stats.num_gpu_experts == 2
    assert provided == [[0, 2]]
    # gated off (`spmoe.plus.host_gate`): the same path without asking the planner
    experts.planner = Planner(None)
    experts.planner.allowed = False
    experts.planner.split = lambda *a: pytest.fail("a gated-off layer call asked for a split")
    assert experts.compute(h, torch.tensor([[2, 1]]), torch.ones(1, 2), site="site") is h
    assert calls == ["site", "site"] and experts.stats.num_gpu_experts == 4 and provided[-1] == [1, 2]


def test_planner_copy_time_is_the_copy_engines_not_the_hosts_round_trip():
    """The host planner's copy time per expert is what the copy engine measures (its spans), not the wall time of a
    load and a sync: a link whose every load carries 5 ms of host latency outside its 1 ms span prices a copy at 1.
    The calibration copies land in slot 0, which gets its expert back (a cache that started full)."""
    from types import SimpleNamespace

    from spmoe.methods.spmoe_plus import _copy_ms
    from spmoe.offload.transfer import TransferStats

    class SlowIssueLink:
        def __init__(self):
            self.pending = TransferStats()

        def load(self, slot, dst, src, prefetch=False, finish=None):
            time.sleep(0.005)  # host-side latency, outside the copy
            dst.copy_(src)
            self.pending.copy_ms += 1.0
            self.pending.h2d_bytes += src.numel() * src.element_size()

        def collect(self):
            out, self.pending = self.pending, TransferStats()
            return out

    layout = ExpertLayout((0,), 2, 1, 4, 2, torch.float32)
    store = SimpleNamespace(flat=lambda key: torch.full((layout.expert_numel,), float(key[1] + 1)))
    storage = torch.zeros(2, layout.expert_numel)  # slot 0 holds expert (0, 1)
    storage[0] = store.flat((0, 1))
    cache = SimpleNamespace(slot=lambda s: storage[s], key_at=lambda s: (0, 1) if s == 0 else None)
    runtime = SimpleNamespace(transfer=SlowIssueLink(), cache=cache)
    ctx = SimpleNamespace(target=SimpleNamespace(store=store, layout=layout), device=torch.device("cpu"))
    assert _copy_ms(runtime, ctx) == pytest.approx(1.0)
    assert torch.equal(storage[0], store.flat((0, 1)))
    assert runtime.transfer.collect().copy_ms == 0.0  # calibration copies are not the run's traffic


def test_planner_copy_time_on_a_paced_link_is_the_emulated_links():
    """With pacing on, the copy time per expert is bytes / the paced bandwidth, with no calibration copy (the
    pacing spin counts GPU clock cycles, which an idle GPU runs slower, so copies timed at build overstate it)."""
    from types import SimpleNamespace

    from spmoe.methods.spmoe_plus import _copy_ms
    from spmoe.offload.pacing import Pacer

    layout = ExpertLayout((0,), 2, 1, 4, 2, torch.float32)
    expert_bytes = layout.expert_numel * 4
    loads = []
    transfer = SimpleNamespace(pacer=Pacer(torch.device("cpu"), 0.001), load=lambda *a, **k: loads.append(a))
    store = SimpleNamespace(flat=lambda key: torch.zeros(layout.expert_numel))
    runtime = SimpleNamespace(transfer=transfer, cache=SimpleNamespace(key_at=lambda s: None))
    ctx = SimpleNamespace(target=SimpleNamespace(store=store, layout=layout), device=torch.device("cpu"))
    assert _copy_ms(runtime, ctx) == pytest.approx(expert_bytes / (0.001 * 1e6))
    assert loads == []


def _gate_run(host_ms_per_missing: float, steps: int = 40, probe_every: int = 8, resident: int = 0,
              history: GateHistory | None = None) -> tuple[HostGate, list[bool]]:
    """Decode steps on a simulated clock, recorded in an event log as a provider does: t = 10 + 1 ms per missing
    expert on the link; a step with 5 or more missing experts computes one (expert 0) on the host when allowed, and
    then costs `host_ms_per_missing` per missing expert instead. Missing experts are 0, 1, ...: expert 0, when
    computed on the host, misses again at the next link step. Each step also finds `resident` other experts
    resident (hits, free). Returns the gate and, per decode step, whether the host was allowed."""
    planner = HostPlanner(_Provider([], 0), "auto", HostCost(fixed_ms=4.0, per_token_ms=1.0, copy_ms=6.0), None)
    events, now = ExpertEventLog(), [0.0]
    gate = HostGate(planner, events, history, min_steps=3, probe_every=probe_every, clock=lambda: now[0])
    gate.begin_step(0)  # the prefill: link only, not sampled
    assert not planner.allowed
    events.record(0, list(range(8)), [], list(range(8)))
    now[0] += 1.0
    gate.end_step()
    events.drain()
    allowed = []
    for step in range(1, steps + 1):
        missing = [1, 6, 2, 7, 3, 5][step % 6]
        gate.begin_step(step)
        allowed.append(planner.allowed)
        host = planner.allowed and missing >= 5
        hits = list(range(100, 100 + resident))
        events.record(0, hits + list(range(missing)), hits, list(range(host, missing)))  # the host expert is no miss
        if host:
            events.mark_host(0, [0])
        now[0] += (10 + (host_ms_per_missing if host else 1.0) * missing) / 1e3
        gate.end_step()
        events.drain()
    return gate, allowed


def test_host_gate_switches_the_host_off_where_it_costs_more_per_missing_expert():
    gate, allowed = _gate_run(host_ms_per_missing=2.0)
    c, b_link, b_host = gate.fit()
    assert c == pytest.approx(10.0) and b_link == pytest.approx(1.0) and b_host == pytest.approx(2.0)
    first_off = allowed.index(False) + 1  # decode steps count from 1
    assert first_off <= 12  # three host and three link steps with varying misses are enough to judge
    for step in range(first_off, 41):  # gated off but for every 8th decode step (a probe)
        assert allowed[step - 1] == (step % 8 == 0), step
    assert gate.summary()["host_gate_steps_off"] == allowed.count(False) and gate.summary()["host_gate_decode_steps"] == 40


def test_a_carried_history_judges_from_the_first_decode_step():
    history = GateHistory()
    first, allowed_first = _gate_run(host_ms_per_missing=2.0, history=history)
    assert all(allowed_first[:6]) and first.summary()["host_gate_carried_samples"] == 0  # learning
    second, allowed = _gate_run(host_ms_per_missing=2.0, history=history)
    assert second.summary()["host_gate_carried_samples"] == 40
    # off from step 1 but for the probes (until the window has slid past the first run's host steps: this
    # simulation's probe steps miss too few experts to compute any on the host)
    assert allowed[:24] == [step % 8 == 0 for step in range(1, 25)]
    assert len(history.samples) == 64  # the window keeps the last 64 decode steps of both runs
    fresh, allowed_fresh = _gate_run(host_ms_per_missing=2.0)
    assert allowed_fresh == allowed_first  # without a history each run learns again


def test_host_gate_keeps_a_host_that_saves_time_and_judges_nothing_without_samples():
    gate, allowed = _gate_run(host_ms_per_missing=0.5)
    assert all(allowed) and gate.fit()[2] == pytest.approx(0.5)
    planner = HostPlanner(_Provider([], 0), "auto", HostCost(fixed_ms=4.0, per_token_ms=1.0, copy_ms=6.0), None)
    assert HostGate(planner, ExpertEventLog()).fit() is None and HostGate(planner, ExpertEventLog()).allowed()


def test_host_gate_charges_host_experts_for_their_repeat_misses():
    """Per missing expert the host is cheaper (0.5 against 1 ms), but expert 0 misses again after every host step;
    with 8 hits beside 1-7 misses a step (hit rate r ~0.7) that repeat costs r x 1 ms more than the host saves."""
    gate, allowed = _gate_run(host_ms_per_missing=0.5, resident=8)
    c, b_link, b_host = gate.fit()
    assert b_host == pytest.approx(0.5) and b_link == pytest.approx(1.0)
    summary = gate.summary()
    assert gate.history.num_host == 3 and summary["host_gate_repeat_rate"] == 1.0  # every host expert missed again
    r = gate.history.num_resident / (gate.history.num_resident + gate.history.num_misses)
    assert 0.6 < r < 0.8 and summary["host_gate_cold_ms"] == pytest.approx(summary["host_gate_repeat_rate"] * r)
    assert not allowed[-2] and summary["host_gate_steps_off"] > 20  # gated off (but for its probes)
    _, without_hits = _gate_run(host_ms_per_missing=0.5)
    assert all(without_hits)  # r = 0: a loaded expert would have missed anyway, no charge


def test_a_gated_off_planner_sends_nothing_to_the_host():
    cost = HostCost(fixed_ms=4.0, per_token_ms=1.0, copy_ms=6.0)
    planner = HostPlanner(_Provider([], 2), "auto", cost, None)
    tokens = {0: 1, 1: 1, 2: 1}
    assert planner.split(0, tokens)  # two copies ahead: the host wins some
    planner.allowed = False
    assert planner.split(0, tokens) == []


def test_routed_tokens_are_route_spans_lengths_in_expert_order():
    from spmoe.models.experts import routed_tokens
    from spmoe.plus.host_experts import route_spans

    gen = torch.Generator().manual_seed(3)
    for num_tokens in (1, 2, 5):
        index = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(num_tokens)])  # [T, 3] in [0, 8]
        tokens_of = routed_tokens(index, 8)  # id 8 is the "no expert" sentinel
        _, span = route_spans(index, 8)
        assert tokens_of == {e: b - a for e, (a, b) in span.items()}
        assert list(tokens_of) == sorted(tokens_of) and 8 not in tokens_of
