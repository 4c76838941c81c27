"""PrefetchProvider rules on hand-made request sequences (CPU: copies are synchronous)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from spmoe.models.experts import ExpertLayout
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import ExpectedReusePolicy, LruPolicy
from spmoe.offload.prefetch import PrefetchProvider, PrefetchRequest
from spmoe.offload.store import ExpertStore
from spmoe.offload.transfer import TransferEngine
from spmoe.trace.records import ExpertEventLog

LAYOUT = ExpertLayout(moe_layers=(0, 1, 2), num_experts=4, top_k=2, hidden_size=2, intermediate_size=2,
                      dtype=torch.float32)


def make(slots: int, worker: bool = False, timeout_s: float = 5.0, policy=None):
    store = ExpertStore(LAYOUT, pin=False)
    for i, key in enumerate(LAYOUT.keys):
        store.flat(key).fill_(float(i))
    cache = ExpertCache(slots, LAYOUT.expert_numel, torch.float32, "cpu", policy or LruPolicy())
    transfer = TransferEngine(torch.device("cpu"), slots)
    loads: list = []
    original = transfer.load

    def recording_load(slot, dst, src, prefetch=False):
        loads.append((int(src[0].item()), prefetch))
        original(slot, dst, src, prefetch)

    transfer.load = recording_load
    provider = PrefetchProvider(cache, store, transfer, ExpertEventLog(), worker_thread=worker, timeout_s=timeout_s)
    return provider, cache, loads


def req(step, layer, ids, position=0):
    return PrefetchRequest(step, layer, position, torch.tensor([ids]))


def consume(provider, layer, ids):
    return [e for e, flat in provider.experts_for(layer, ids)]


def key_id(layer, expert):
    return LAYOUT.keys.index((layer, expert))


def test_prefetch_then_verify_counts_prefetch_hits_and_misses():
    provider, cache, loads = make(slots=6)
    provider.begin_step(1)
    provider.submit(req(1, 0, [1, 2]))
    provider.submit(req(1, 1, [0, 3]))
    assert loads == [(key_id(0, 1), True), (key_id(0, 2), True), (key_id(1, 0), True), (key_id(1, 3), True)]
    assert consume(provider, 0, [1, 3]) == [1, 3]  # 1 prefetched, 3 on demand
    ev = provider.events.drain()[0]
    assert (ev.prefetch_hits, ev.misses, ev.hits, ev.predicted) == ([1], [3], [], [1, 2])
    assert loads[-1] == (key_id(0, 3), False)
    provider.end_step()
    assert provider.take_counts() == (4, 0, 0)
    assert cache.misses == 1  # prefetch admissions are not misses


def test_protected_prefetches_are_not_evicted_and_full_cache_drops():
    provider, cache, loads = make(slots=2)
    provider.begin_step(1)
    provider.submit(req(1, 1, [0, 1]))  # fills both slots, protected until layer 1 passes
    provider.submit(req(1, 2, [2]))  # no unprotected slot left: dropped
    assert provider.take_counts() == (2, 1, 0)
    # layer 0 needs an expert: the deepest later layer's protection is given up, not a hang
    assert consume(provider, 0, [3]) == [3]
    provider.end_step()
    assert all(cache._pins[s] == 0 for s in range(2))


def test_requests_for_layers_verification_passed_are_dropped():
    provider, cache, loads = make(slots=6)
    provider.begin_step(1)
    consume(provider, 0, [0])
    consume(provider, 1, [0])
    provider.submit(req(1, 1, [2, 3]))  # too late: verification already at layer 1
    provider.submit(req(0, 2, [2]))  # a stale step
    provider.submit(req(1, 2, [1]))  # still ahead: served
    assert provider.take_counts() == (1, 3, 0)


def test_unused_prefetch_evicted_is_wasted():
    provider, cache, loads = make(slots=2)
    provider.begin_step(1)
    provider.submit(req(1, 0, [0, 1]))
    consume(provider, 0, [0, 2])  # 1 is not used; 2 needs a slot
    provider.end_step()
    provider.begin_step(2)
    consume(provider, 1, [0, 1])  # evicts what is left, including the unused prefetch (0, 1)
    provider.end_step()
    provider.close()
    prefetched, dropped, wasted = provider.take_counts()
    assert (prefetched, wasted) == (2, 1)


def test_worker_thread_serves_in_order_and_errors_surface():
    provider, cache, loads = make(slots=6, worker=True)
    provider.begin_step(1)
    for layer in (0, 1, 2):
        provider.submit(req(1, layer, [layer, 3]))
    provider.wait_idle()
    assert [l for l, _ in loads] == [key_id(0, 0), key_id(0, 3), key_id(1, 1), key_id(1, 3), key_id(2, 2), key_id(2, 3)]
    provider.store.flat = lambda key: (_ for _ in ()).throw(OSError("disk on fire"))
    provider.end_step()
    provider.begin_step(2)
    provider.submit(req(2, 0, [1]))
    with pytest.raises(RuntimeError, match="disk on fire"):
        provider.wait_idle()
    provider.close()


def test_a_stuck_prediction_times_out():
    class NeverReady:
        def query(self):
            return False

    provider, cache, loads = make(slots=4, timeout_s=0.05)
    provider.begin_step(1)
    with pytest.raises(TimeoutError, match="not ready"):
        provider.submit(PrefetchRequest(1, 0, 0, torch.tensor([[1]]), NeverReady()))


def test_a_stuck_prediction_in_the_worker_times_out_on_the_main_thread():
    release = threading.Event()

    class Stuck:
        def query(self):
            return False

        def synchronize(self):  # the worker blocks here without the GIL, as on a dead device
            release.wait(10)

    provider, cache, loads = make(slots=4, worker=True, timeout_s=0.05)
    provider.begin_step(1)
    provider.submit(PrefetchRequest(1, 0, 0, torch.tensor([[1]]), Stuck()))
    with pytest.raises(TimeoutError, match="still busy"):
        provider.end_step()
    release.set()


def test_worker_serves_earlier_layers_first():
    provider, cache, loads = make(slots=6, worker=True)
    provider.begin_step(1)
    with provider.lock:  # hold the worker while the queue fills in reverse layer order
        for layer in (2, 1, 0):
            provider.submit(req(1, layer, [layer]))
        time.sleep(0.05)
    provider.wait_idle()
    served = [l for l, _ in loads]
    # the first request may have been taken before the others arrived; the rest come layer-ordered
    assert served[-2:] == sorted(served[-2:]) and set(served) == {key_id(0, 0), key_id(1, 1), key_id(2, 2)}
    provider.close()


def test_a_prefetch_that_would_evict_a_key_needed_sooner_is_dropped():
    provider, cache, loads = make(slots=3, policy=ExpectedReusePolicy(LAYOUT.moe_layers))
    for _ in range(2):  # two steps used expert 0 of every layer: verification ended at layer 2
        for layer in (0, 1, 2):
            consume(provider, layer, [0])
    provider.begin_step(1)
    cache.pin(cache.slot_of((1, 0)))  # say protected: only (0,0) and (2,0) can be evicted
    cache.pin(cache.slot_of((2, 0)))
    # next uses (n = 3, q = 3/4): (0,0) 0 + 3 (4/3 - 1) = 1, sooner than a layer-2 prefetch (2 away)
    provider.submit(req(1, 2, [3]))
    assert loads[-1] != (key_id(2, 3), True) and (2, 3) not in cache
    assert provider.take_counts() == (0, 1, 0)
    # a layer-0 prefetch (0 away) is needed before (0,0)'s expected next use: admitted, evicting it
    provider.submit(req(1, 0, [3]))
    assert loads[-1] == (key_id(0, 3), True) and (0, 3) in cache and (0, 0) not in cache
    assert provider.take_counts() == (1, 0, 0)
