"""ExpertCache + eviction policies: exact hit/miss/eviction counts on hand-written sequences."""

from __future__ import annotations

import random

import pytest
import torch

from spmoe.offload.cache import ExpertCache, NoEvictableSlot
from spmoe.offload.eviction import LfuPolicy, LruPolicy, make_policy

A, B, C, D, E = (0, 0), (0, 1), (0, 2), (0, 3), (1, 0)
SEQ = [A, B, C, A, D, B, E, A, C]


def run(policy, seq, slots=3):
    cache = ExpertCache(slots, 4, torch.float32, "cpu", policy)
    evicted = []
    for key in seq:
        _, _, ev = cache.access(key)
        if ev is not None:
            evicted.append(ev)
    return cache, evicted


def test_lru_counts_and_victims():
    cache, evicted = run(LruPolicy(), SEQ)
    assert (cache.hits, cache.misses, cache.evictions) == (1, 8, 5)
    assert evicted == [B, C, A, D, B]
    assert set(cache.resident()) == {E, A, C}


def test_lfu_counts_and_victims():
    # counts survive eviction; ties broken by least recent use
    cache, evicted = run(LfuPolicy(), SEQ)
    assert (cache.hits, cache.misses, cache.evictions) == (2, 7, 4)
    assert evicted == [B, C, D, E]
    assert set(cache.resident()) == {A, B, C}


def test_lfu_keeps_frequent_expert_that_lru_drops():
    seq = [A, A, A, B, C, D, A]
    lru, _ = run(LruPolicy(), seq, slots=2)
    lfu, _ = run(LfuPolicy(), seq, slots=2)
    assert (lru.hits, lru.misses) == (2, 5)  # A is evicted by C, reloaded at the end
    assert (lfu.hits, lfu.misses) == (3, 4)  # A (count 3) is never the victim


def test_fits_without_eviction():
    cache, evicted = run(LruPolicy(), [A, B, A, B, A], slots=2)
    assert (cache.hits, cache.misses, cache.evictions) == (3, 2, 0)
    assert evicted == []


def test_pinned_slots_are_never_evicted():
    cache = ExpertCache(2, 4, torch.float32, "cpu", LruPolicy())
    slot_a, _, _ = cache.access(A)
    cache.access(B)
    cache.pin(slot_a)
    _, _, evicted = cache.access(C)
    assert evicted == B  # A is older but pinned
    cache.pin(cache.lookup(C))
    assert not cache.can_admit()
    with pytest.raises(NoEvictableSlot):
        cache.admit(D)


def test_preload_is_not_counted():
    cache = ExpertCache(2, 4, torch.float32, "cpu", LruPolicy())
    cache.preload(A)
    assert (cache.hits, cache.misses) == (0, 0)
    assert cache.access(A)[1] is True


def test_bad_input():
    with pytest.raises(ValueError, match="at least one slot"):
        ExpertCache(0, 4, torch.float32, "cpu", LruPolicy())
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'; valid: .*'layer_distance', 'lfu', 'lru'"):
        make_policy("fifo")
    cache = ExpertCache(1, 4, torch.float32, "cpu", LruPolicy())
    cache.access(A)
    with pytest.raises(ValueError, match="already resident"):
        cache.admit(A)


def test_per_layer_partition_evicts_within_the_layer():
    # layer 0 owns 2 slots, layer 1 owns 1 slot
    cache = ExpertCache(3, 4, torch.float32, "cpu", LruPolicy(), slots_per_layer={0: 2, 1: 1})
    seq = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 2), (1, 0)]
    evicted = [cache.access(k)[2] for k in seq]
    # (1,1) evicts (1,0) although (0,0) is older: partitions do not share slots
    assert evicted == [None, None, None, (1, 0), None, (0, 1), (1, 1)]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 6, 3)
    assert cache.can_admit((0, 5)) and cache.can_admit((1, 5))
    with pytest.raises(ValueError, match="layer 2 has no slots"):
        cache.access((2, 0))
    with pytest.raises(ValueError, match="slots_per_layer"):
        ExpertCache(2, 4, torch.float32, "cpu", LruPolicy(), slots_per_layer={0: 2, 1: 1})


def test_layer_distance_evicts_the_layer_needed_last():
    from spmoe.offload.eviction import LayerDistancePolicy

    # 3 layers x 2 experts cycled (one token per pass); 4 slots
    seq = [(0, 0), (1, 0), (2, 0), (0, 0), (1, 0), (2, 0), (0, 0), (1, 0), (2, 0)]
    lru, _ = run(LruPolicy(), seq, slots=2)
    ld, evicted = run(LayerDistancePolicy([0, 1, 2]), seq, slots=2)
    assert (lru.hits, lru.misses) == (0, 9)  # LRU thrashes on a cycle longer than the cache
    # layer distance keeps (0,0): after layer 2, layer 0 comes next; the just-used layer goes
    assert evicted[0] == (1, 0)  # (2,0) admitted right after layer 1 was computed -> layer 1 is farthest
    assert (ld.hits, ld.misses) == (3, 6)


@pytest.mark.parametrize("partition", [None, {0: 2, 1: 3}])
def test_can_admit_matches_a_scan_of_the_slots(partition):
    """`can_admit` keeps O(1) counts of evictable slots; they agree with scanning every slot
    through random admits, pins and unpins."""
    rng = random.Random(0)
    cache = ExpertCache(6, 4, torch.float32, "cpu", LruPolicy(), slots_per_layer=partition)
    pinned: list[int] = []
    for _ in range(400):
        key = (rng.randrange(2), rng.randrange(6))
        op = rng.random()
        if op < 0.5 and key not in cache and cache.can_admit(key):
            slot, _ = cache.admit(key)
            if rng.random() < 0.5:
                cache.pin(slot)
                pinned.append(slot)
        elif op < 0.7 and key in cache:
            cache.pin(cache.slot_of(key))
            pinned.append(cache.slot_of(key))
        elif pinned:
            cache.unpin(pinned.pop(rng.randrange(len(pinned))))
        for layer in (0, 1):
            pool = layer if partition else None
            scan = bool(cache._free_of[pool]) or any(
                cache._pins[s] == 0 and (pool is None or k[0] == pool) for k, s in cache._slot_of.items())
            assert cache.can_admit((layer, 0)) == scan


def test_expected_reuse_weighs_frequency_against_layer_distance():
    from spmoe.offload.eviction import ExpectedReusePolicy, LayerDistancePolicy

    # three visits of layers 0, 1, 2; (0,1) was used at 1 of layer 0's 3 visits, (2,0) at all 3 of layer 2's
    seq = [(0, 0), (0, 1), (1, 0), (2, 0), (0, 0), (1, 0), (2, 0), (0, 0), (1, 0), (2, 0)]
    er, ld = ExpectedReusePolicy([0, 1, 2]), LayerDistancePolicy([0, 1, 2])
    for key in seq:
        er.touch(key)
        ld.touch(key)
    # next use = d + n (1/q - 1): (0,1): d=0, q=2/5 -> 4.5; (2,0): d=2, q=4/5 -> 2.75
    assert er.next_use((0, 1)) == pytest.approx(4.5) and er.next_use((2, 0)) == pytest.approx(2.75)
    assert er.victim([(0, 1), (2, 0)]) == (0, 1)  # rarely used, though its layer comes next
    assert ld.victim([(0, 1), (2, 0)]) == (2, 0)  # layer distance only sees that layer 2 comes last
    er.touch((1, 3), demand=False)  # a prefetch admission is not a use and not a visit
    assert er.next_use((0, 1)) == pytest.approx(4.5) and er.next_use((1, 3)) == pytest.approx(1 + 3 * (5 - 1))


def test_expected_reuse_counts_on_a_cache():
    # 2 layers x (one hot expert + a new cold one every visit), 3 slots: the hot pair stays resident
    seq = [key for v in range(6) for key in ((0, 0), (0, 1 + v), (1, 0), (1, 1 + v))]
    er, _ = run(make_policy("expected_reuse", [0, 1]), seq, slots=3)
    ld, _ = run(make_policy("layer_distance", [0, 1]), seq, slots=3)
    lru, _ = run(LruPolicy(), seq, slots=3)
    # by hand: ER keeps both hot experts from the third visit on (2 hits, 2 misses per visit);
    # layer distance evicts the hot (0,0) whenever layer 0 is the farthest layer with a victim
    assert (er.hits, er.misses) == (9, 15)
    assert (ld.hits, ld.misses) == (7, 17)
    assert (lru.hits, lru.misses) == (0, 24)
