"""The layer-grouped path of offloaded layers (spmoe.offload.layer_slots, `serve_layer` of the offloading
providers): every offloading method with an evicting cache gives bit-identical tokens and identical
events, admissions and evictions with it on and off; a layer whose misses outnumber the slots that can
be freed falls back to the per-expert iterator (same tokens); a wrong slot in the map is caught."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_reference_session, tiny_run_config
from torch import nn

from spmoe.config import CutoffConfig, MethodConfig, PlusConfig, SpecConfig
from spmoe.methods import STRATEGIES, get_strategy
from spmoe.models.experts import ExpertLayout, OffloadedExperts
from spmoe.offload import layer_slots
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import LruPolicy
from spmoe.offload.layer_slots import LayerSlots
from spmoe.offload.provider import OnDemandProvider
from spmoe.offload.store import ExpertStore
from spmoe.offload.transfer import TransferEngine
from spmoe.session import open_session
from spmoe.trace.records import ExpertEventLog

get_strategy("gpu_resident")  # populate the registry
TOKENS = 10
OFFLOADING = sorted(m for m, s in STRATEGIES.items() if s.offloads and m != "accelerate")  # accelerate: no cache


@pytest.fixture(scope="module")
def session():
    s = tiny_reference_session("tiny", "tiny", 2, TOKENS)
    yield s
    s.close()


class Spy:
    """Every admission (key, slot, evicted key) and how each layer was served, grouped or not."""

    def __init__(self, monkeypatch):
        self.admits, self.grouped_layers, self.fallback_layers = [], 0, 0
        admit, init = ExpertCache.admit, LayerSlots.__init__

        def spy_admit(cache, key, count_miss=True):
            slot, evicted = admit(cache, key, count_miss)
            self.admits.append((key, slot, evicted, count_miss))
            return slot, evicted

        def spy_init(slots, *args, **kwargs):
            self.grouped_layers += 1
            init(slots, *args, **kwargs)

        monkeypatch.setattr(ExpertCache, "admit", spy_admit)
        monkeypatch.setattr(LayerSlots, "__init__", spy_init)


def _events(gens) -> list:
    return [(r.step, ev.layer, ev.needed, ev.hits, ev.misses, ev.prefetch_hits, ev.late)
            for g in gens for r in g.records for ev in r.layers]


def _generate(s, method: MethodConfig, k: int, layer_grouped: bool, monkeypatch):
    spy = Spy(monkeypatch)
    OffloadedExperts.layer_grouped = layer_grouped
    try:
        gens, _, _ = s.generate(method, s.cfg.hardware, TOKENS, spec_cfg=SpecConfig(num_draft_tokens=k))
    finally:
        OffloadedExperts.layer_grouped = True
        monkeypatch.undo()
    return [g.token_ids for g in gens], _events(gens), spy


def _method(name: str, num_slots: int, host_compute: str = "off") -> MethodConfig:
    # inline prefetch (no worker thread) and no profiled cutoff: admissions are deterministic, so on and off
    # must match exactly
    return MethodConfig(name=name, num_slots=num_slots, worker_thread=False, adaptive_gating=False,
                        cutoff=CutoffConfig(mode="all"),
                        plus=PlusConfig(host_compute=host_compute, draft_precision="bf16"))


@pytest.mark.parametrize("name", OFFLOADING)
def test_grouped_and_per_expert_agree_exactly(session, name, monkeypatch):
    _agree_exactly(session, name, monkeypatch)


@pytest.mark.parametrize("name", ["lru_nosd", "mixtral_offloading_nosd", "moe_infinity_nosd"])
def test_agree_exactly_on_deepseek_v2(name, monkeypatch):
    """MLA attention, a shared expert and a dense first layer: the experts seam is the same."""
    s = open_session(tiny_run_config("tiny_deepseek_v2", num_prompts=2, max_new_tokens=TOKENS))
    try:
        gens, _, _ = s.generate(MethodConfig(name="gpu_resident"), s.cfg.hardware, TOKENS)
        s.reference = [g.token_ids for g in gens]
        _agree_exactly(s, name, monkeypatch)
    finally:
        s.close()


def test_host_experts_split_agrees_exactly(session, monkeypatch):
    """spmoe_plus computing every missing expert on the host: its GPU experts (the hits) run grouped,
    the host experts' routes as "no expert" rows that the host outputs fill."""
    _agree_exactly(session, "spmoe_plus", monkeypatch, host_compute="all")
    assert session.last_extra["host_experts"] > 0 and session.last_extra["gpu_experts"] > 0


def _agree_exactly(session, name: str, monkeypatch, host_compute: str = "off") -> None:
    layout = session.target.layout
    slots = 2 * len(layout.moe_layers) + 1  # a few per layer: every method evicts, most layers fit at once
    k = 2 if STRATEGIES[name].speculative else 1
    tokens, events, spy = _generate(session, _method(name, slots, host_compute), k, True, monkeypatch)
    tokens_off, events_off, spy_off = _generate(session, _method(name, slots, host_compute), k, False, monkeypatch)
    assert tokens == tokens_off == session.reference
    assert events == events_off
    assert spy.admits == spy_off.admits  # same keys, slots and victims, in the same order
    assert any(evicted is not None for _, _, evicted, _ in spy.admits)  # the cache did evict
    assert spy.grouped_layers > 0 and spy_off.grouped_layers == 0


def test_fallback_when_a_layer_needs_more_slots_than_it_can_free(session, monkeypatch):
    """lru with k = 3 verifies 4 tokens: their union at a layer often exceeds top_k slots; such layers
    stream through the per-expert iterator, the others run grouped; tokens and events match."""
    top_k = session.target.layout.top_k
    served = []
    original = OnDemandProvider.serve_layer

    def spy_serve(provider, *args, **kwargs):
        out = original(provider, *args, **kwargs)
        served.append(isinstance(out, LayerSlots))
        return out

    monkeypatch.setattr(OnDemandProvider, "serve_layer", spy_serve)
    OffloadedExperts.layer_grouped = True
    try:
        gens, _, _ = session.generate(MethodConfig(name="lru", num_slots=top_k), session.cfg.hardware, TOKENS,
                                      spec_cfg=SpecConfig(num_draft_tokens=3))
    finally:
        monkeypatch.undo()
    tokens, events = [g.token_ids for g in gens], _events(gens)
    assert True in served and False in served  # both ways were taken
    tokens_off, events_off, _ = _generate(session, MethodConfig(name="lru", num_slots=top_k), 3, False, monkeypatch)
    assert tokens == tokens_off == session.reference
    assert events == events_off


LAYOUT = ExpertLayout((0, 1), 6, 2, 32, 24, torch.float32)


# [T, A] routes of three calls of one layer over a 5-slot cache: all misses (slots 0-4); hits in slots 0, 2, 4
# and a "no expert" route (6), served by the spare slot 1; misses that evict
CALLS = [torch.tensor([[0, 1], [2, 3], [4, 1]]), torch.tensor([[0, 2], [2, 4], [4, 6]]),
         torch.tensor([[5, 0], [3, 5], [1, 0]])]


def _layer_outputs(x: torch.Tensor, layer_grouped: bool, slots: int = 5) -> list[torch.Tensor]:
    """One layer computed for each of CALLS over the same evicting cache: [T, A, H] each."""
    store = ExpertStore(LAYOUT, pin=False)
    store.fill_random(0, 0.1, torch.device("cpu"))
    cache = ExpertCache(slots, LAYOUT.expert_numel, torch.float32, "cpu", LruPolicy())
    provider = OnDemandProvider(cache, store, TransferEngine(torch.device("cpu"), slots), ExpertEventLog())
    experts = OffloadedExperts(0, LAYOUT, nn.SiLU(), provider)
    OffloadedExperts.layer_grouped = layer_grouped
    try:
        outs = [experts._per_expert(x, index) for index in CALLS]
    finally:
        OffloadedExperts.layer_grouped = True
    assert cache.evictions > 0 and cache.hits > 0
    assert sum(cache._pins.values()) == 0  # every pin dropped
    return outs


def test_layer_grouped_is_bitwise_the_per_expert_path():
    x = torch.randn(3, 32)
    grouped, loop = _layer_outputs(x, True), _layer_outputs(x, False)
    assert all(torch.equal(a, b) for a, b in zip(grouped, loop))
    assert torch.all(grouped[1][2, 1] == 0) and grouped[1][2, 0].abs().sum() > 0


def test_a_wrong_slot_in_the_map_is_caught(monkeypatch):
    """Planted bug: the slot map sends one routed expert to another routed expert's slot."""
    right = layer_slots.slot_map

    def swapped(ready, num_experts):
        lo, hi, table = right(ready, num_experts)
        if len(ready) > 1:
            table[ready[0][0]] = table[ready[1][0]]
        return lo, hi, table

    x = torch.randn(3, 32)
    loop = _layer_outputs(x, False)
    monkeypatch.setattr(layer_slots, "slot_map", swapped)
    planted = _layer_outputs(x, True)
    assert not all(torch.equal(a, b) for a, b in zip(planted, loop))


def test_slot_map_spans_the_layers_slots_with_a_spare_for_the_rest():
    # (lo, hi, map relative to lo); unrouted experts and entry E go to the spare slot
    assert layer_slots.slot_map([(0, 3), (3, 5)], 4) == (3, 6, [0, 1, 1, 2, 1])  # a spare inside the span
    assert layer_slots.slot_map([(0, 3), (3, 4)], 4) == (3, 5, [0, 0, 0, 1, 0])  # none: slot lo's group
    assert layer_slots.slot_map([], 4) == (0, 1, [0, 0, 0, 0, 0])  # nothing routed


class FakeSite:
    """A piecewise call site that runs the layer eagerly and counts its uses (the graph is GPU only)."""

    def __init__(self):
        self.runs = 0

    def run(self, layer):
        self.runs += 1
        return layer()


@pytest.mark.parametrize("slots, graphed_calls", [(5, 3), (2, 0)])
def test_a_site_runs_a_pinned_layer_and_nothing_else(monkeypatch, slots, graphed_calls):
    """At a piecewise call site a layer whose experts are all pinned goes through `site.run`, same bits
    as without a site; a layer that falls back to one expert at a time (2 slots, 3+ experts) does not."""
    monkeypatch.setattr(OffloadedExperts, "_kernels", lambda self, x: True)  # as if the GPU kernels served
    monkeypatch.setattr(LayerSlots, "static", property(lambda self: True))
    torch.manual_seed(1)
    x, weights = torch.randn(3, 32), torch.rand(3, 2)

    def run(site):
        store = ExpertStore(LAYOUT, pin=False)
        store.fill_random(0, 0.1, torch.device("cpu"))
        cache = ExpertCache(slots, LAYOUT.expert_numel, torch.float32, "cpu", LruPolicy())
        provider = OnDemandProvider(cache, store, TransferEngine(torch.device("cpu"), slots), ExpertEventLog())
        experts = OffloadedExperts(0, LAYOUT, nn.SiLU(), provider)
        outs = [experts.compute(x, index, weights, site=site) for index in CALLS]
        assert sum(cache._pins.values()) == 0  # every pin dropped after the site ran
        return outs

    site = FakeSite()
    with_site, without = run(site), run(None)
    assert site.runs == graphed_calls
    assert all(torch.equal(a, b) for a, b in zip(with_site, without))


def test_slot_tables_upload_a_layer_row_only_when_a_routed_entry_moved():
    tables = layer_slots.SlotTables(4, torch.device("cpu"))
    row = tables.update(1, [(0, 7), (2, 3)])
    assert tables.num_uploads == 1 and row.tolist() == [7, 0, 3, 0, 0]
    assert tables.update(1, [(2, 3), (0, 7)]) is row and tables.num_uploads == 1  # nothing moved
    tables.update(1, [(2, 3), (1, 5)])  # expert 1 is new: one upload; expert 0 keeps its entry
    assert tables.num_uploads == 2 and row.tolist() == [7, 5, 3, 0, 0]
    tables.update(2, [(2, 3)])  # another layer: its own row
    assert tables.num_uploads == 3 and row.tolist() == [7, 5, 3, 0, 0]
    assert tables.upload(1, [1, 1, 1, 1, 1]).tolist() == [1, 1, 1, 1, 1] and tables.num_uploads == 4
