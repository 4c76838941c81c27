"""PrefetchProvider across threads: the worker thread (requests) and the main thread (verification)
share the cache, its eviction policy and the provider's prediction bookkeeping.

- Every call that reads or changes the cache's residency, pins or policy state runs under the
  provider's lock, on both threads (checked on real runs: spmoe with LRU, whose `victim_where` scans
  its touch-ordered dict, and spmoe_plus with host-computed experts and fills). Only `slot_of` (one
  dict read) and `slot` (a view of the storage) are read without it.
- Verification of layer l reads the predictions recorded for (step, l) while the worker may still add
  late ones for that layer (it records a request before dropping it as too late): seen on a loaded
  machine as "RuntimeError: dictionary changed size during iteration" in spmoe_plus's tests."""

from __future__ import annotations

import itertools
import threading
from collections import Counter

import pytest
import torch
from conftest import open_with_reference, tiny_twin_config

from spmoe.config import CutoffConfig, MethodConfig, PlusConfig, SpecConfig
from spmoe.models.experts import ExpertLayout
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import LayerDistancePolicy, LfuPolicy, LruPolicy
from spmoe.offload.prefetch import PrefetchProvider, PrefetchRequest
from spmoe.offload.store import ExpertStore
from spmoe.offload.transfer import TransferEngine
from spmoe.trace.records import ExpertEventLog

CACHE_CALLS = ("lookup", "admit", "access", "preload", "pin", "unpin", "can_admit", "has_free_slot",
               "would_evict_sooner_needed", "resident")
POLICY_CALLS = [(LruPolicy, "touch"), (LruPolicy, "on_evict"), (LruPolicy, "victim"), (LruPolicy, "victim_where"),
                (LfuPolicy, "touch"), (LfuPolicy, "victim"), (LayerDistancePolicy, "touch"),
                (LayerDistancePolicy, "victim"), (LayerDistancePolicy, "victim_by_layer")]


@pytest.fixture
def lock_checked(monkeypatch):
    """Counts cache and policy calls per (name, thread) for caches served by a PrefetchProvider, and lists
    those made without the provider's lock held by the calling thread."""
    calls: Counter = Counter()
    unlocked: list[tuple[str, str]] = []
    init = PrefetchProvider.__init__

    def provider_init(self, cache, *args, **kwargs):
        init(self, cache, *args, **kwargs)
        cache._owner_lock = cache.policy._owner_lock = self.lock

    def checked(name, fn):
        def call(self, *args, **kwargs):
            lock = getattr(self, "_owner_lock", None)
            if lock is not None:
                thread = threading.current_thread().name
                calls[(name, thread)] += 1
                if not lock._is_owned():
                    unlocked.append((name, thread))
            return fn(self, *args, **kwargs)
        return call

    monkeypatch.setattr(PrefetchProvider, "__init__", provider_init)
    for name in CACHE_CALLS:
        monkeypatch.setattr(ExpertCache, name, checked(name, getattr(ExpertCache, name)))
    for cls, name in POLICY_CALLS:
        monkeypatch.setattr(cls, name, checked(f"{cls.__name__}.{name}", cls.__dict__[name]))
    return calls, unlocked


@pytest.fixture(scope="module")
def twin():
    s = open_with_reference(tiny_twin_config(max_new_tokens=12), 12)
    yield s
    s.close()


@pytest.mark.parametrize("name,eviction,plus", [
    ("spmoe", "lru", PlusConfig()),
    ("spmoe_plus", "layer_distance", PlusConfig(draft_precision="bf16", host_compute="all", host_fill=True,
                                                adaptive_k=False)),
])
def test_cache_and_policy_calls_hold_the_provider_lock(twin, lock_checked, name, eviction, plus):
    calls, unlocked = lock_checked
    method = MethodConfig(name=name, num_slots=6, eviction=eviction, cutoff=CutoffConfig(mode="fixed", layer=1),
                          plus=plus)
    gens, _, _ = twin.generate(method, twin.cfg.hardware, 12, spec_cfg=SpecConfig(num_draft_tokens=2))
    assert [g.token_ids for g in gens] == twin.reference
    assert calls[("admit", "spmoe-prefetch")] > 0 and calls[("admit", "MainThread")] > 0  # both threads admitted
    victims = "LruPolicy.victim_where" if eviction == "lru" else "LayerDistancePolicy.victim_by_layer"
    assert sum(n for (call, _), n in calls.items() if call == victims) > 0  # the cache was full: victims chosen
    assert unlocked == []


LAYOUT = ExpertLayout(moe_layers=(0, 1), num_experts=4, top_k=2, hidden_size=2, intermediate_size=2,
                      dtype=torch.float32)


def test_verification_reads_its_layers_predictions_while_late_ones_arrive():
    """A late request for the layer being verified lands while verification scores the layer's
    predictions (the worker's interleaving, made deterministic: the request is served inline from the
    routed-ids reads). Verification scores the predictions it found; the late one is dropped."""
    store = ExpertStore(LAYOUT, pin=False)
    cache = ExpertCache(8, LAYOUT.expert_numel, torch.float32, "cpu", LruPolicy())
    provider = PrefetchProvider(cache, store, TransferEngine(torch.device("cpu"), 8), ExpertEventLog(),
                                worker_thread=False)
    provider.begin_step(1)
    provider.submit(PrefetchRequest(1, 0, 0, torch.tensor([[1, 2]])))
    provider.submit(PrefetchRequest(1, 0, 1, torch.tensor([[2, 3]])))
    routed = torch.tensor([[1, 0], [2, 1], [3, 0]])  # [T, A]
    positions = itertools.count(2)

    class LateArrivals:
        shape = routed.shape

        def __getitem__(self, index):
            provider.submit(PrefetchRequest(1, 0, next(positions), torch.tensor([[0, 3]])))
            return routed[index]

    assert [e for e, _ in provider.experts_for(0, [1, 2], LateArrivals())] == [1, 2]
    event = provider.events.drain()[0]
    assert (event.top1_correct, event.top1_total) == (2, 2)
    provider.end_step()
    assert provider.take_counts()[1] == 2 * 2  # the two late requests' experts, dropped
