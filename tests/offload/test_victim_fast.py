"""The host-side shortcuts of victim selection name the victims the plain rules name.

LRU's `victim_where` (scan in touch order) against `min(candidates, key=last use)` over the listed
candidates, and layer_distance's `victim_by_layer` (farthest layer with an evictable key first)
against its `max` over all candidates, on a global and a partitioned cache with pins held across
admissions; MoE-Infinity's per-call layer factors against `score`; expected_reuse's and
sd_lookahead's inlined victims against `max` over their `next_use`."""

from __future__ import annotations

import random

import torch

from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import ExpectedReusePolicy, LayerDistancePolicy, LruPolicy
from spmoe.offload.eviction_lookahead import SdLookaheadPolicy
from spmoe.offload.eviction_priority import PriorityPolicy


class ListedLru(LruPolicy):
    """LRU without the shortcut: the cache lists candidates and calls `victim`."""

    victim_where = None


class ListedLayerDistance(LayerDistancePolicy):
    victim_by_layer = None


def _access(cache: ExpertCache, key, rng: random.Random, out: list, pinned: list, demand_p: float = 1.0) -> None:
    """Look `key` up, admit it on a miss (a demand miss with probability `demand_p`, else a prefetch),
    recording (key, slot, evicted); pin the slot with probability 0.3."""
    slot = cache.lookup(key)
    if slot is None and cache.can_admit(key):
        slot, evicted = cache.admit(key, count_miss=demand_p >= 1.0 or rng.random() < demand_p)
        out.append((key, slot, evicted))
    if slot is not None and rng.random() < 0.3:
        cache.pin(slot)
        pinned.append(slot)


def _unpin_some(cache: ExpertCache, rng: random.Random, pinned: list, most: int, p: float) -> None:
    while pinned and (len(pinned) > most or rng.random() < p):
        cache.unpin(pinned.pop(rng.randrange(len(pinned))))


def _trace(policy, slots_per_layer=None, seed=0) -> list:
    rng = random.Random(seed)
    cache = ExpertCache(12, 1, torch.float32, "cpu", policy, slots_per_layer)
    out, pinned = [], []
    for _ in range(600):
        _access(cache, (rng.randrange(3), rng.randrange(10)), rng, out, pinned)
        _unpin_some(cache, rng, pinned, 5, 0.2)
    return out + [(cache.hits, cache.misses, cache.evictions)]


def test_lru_victim_where_matches_listed_candidates():
    for seed in range(3):
        assert _trace(LruPolicy(), seed=seed) == _trace(ListedLru(), seed=seed)
        assert _trace(LruPolicy(), {0: 4, 1: 4, 2: 4}, seed) == _trace(ListedLru(), {0: 4, 1: 4, 2: 4}, seed)
    assert len(_trace(LruPolicy())) > 100  # evictions happened


def test_layer_distance_victim_by_layer_matches_listed_candidates():
    for seed in range(3):
        fast, listed = _trace(LayerDistancePolicy([0, 1, 2]), seed=seed), _trace(ListedLayerDistance([0, 1, 2]), seed=seed)
        assert fast == listed and len(fast) > 100
        parts = {0: 4, 1: 4, 2: 4}
        assert _trace(LayerDistancePolicy([0, 1, 2]), parts, seed) == _trace(ListedLayerDistance([0, 1, 2]), parts, seed)


def test_lru_victim_where_skips_unevictable_and_reports_none():
    p = LruPolicy()
    for key in [(0, 0), (0, 1), (0, 2), (0, 0)]:
        p.touch(key)
    assert p.victim_where(lambda k: True) == (0, 1)
    assert p.victim_where(lambda k: k != (0, 1)) == (0, 2)
    assert p.victim_where(lambda k: False) is None


def test_priority_victim_matches_score():
    rng = random.Random(1)
    p = PriorityPolicy([0, 1, 2], 8)
    for step in range(200):
        layer = rng.randrange(3)
        p.set_layer(layer)
        p.record(layer, [rng.randrange(8) for _ in range(2)])
        p.touch((layer, rng.randrange(8)))
        if step % 50 == 49:
            p.new_sequence()
        cands = rng.sample([(layer_, e) for layer_ in range(3) for e in range(8)], 10)
        assert p.victim(cands) == min(cands, key=lambda k: (p.score(k), p._last_use.get(k, 0)))


def _scored_victim(p, candidates):
    """The plain rule the inlined victims keep: farthest `next_use`, then the oldest last visit, first such."""
    return max(candidates, key=lambda k: (p.next_use(k), -p._last_visit.get(k, 0)))


def test_expected_reuse_and_sd_lookahead_victims_match_next_use():
    rng = random.Random(3)
    layers = [0, 1, 2, 3]
    for policy in (ExpectedReusePolicy(layers), SdLookaheadPolicy(layers), SdLookaheadPolicy(layers, discount=1.0)):
        for step in range(300):
            layer = rng.choice([0, 0, 0, 1, 2, 3])  # uneven visits: layers' frequencies differ
            for e in rng.sample(range(8), 2):
                policy.touch((layer, e), demand=rng.random() < 0.9)
            if isinstance(policy, SdLookaheadPolicy) and step % 7 == 0:
                policy.predict(step // 4, layers[(step + 1) % 4], rng.sample(range(8), 3))
            cands = rng.sample([(lay, e) for lay in layers for e in range(8)], 12)
            cands += cands[:2]  # repeated keys: the first of equals wins, as with max()
            assert policy.victim(cands) == _scored_victim(policy, cands)


class ListedExpectedReuse(ExpectedReusePolicy):
    victim_by_layer = None


class ListedSdLookahead(SdLookaheadPolicy):
    victim_by_layer = None


def _cache_trace(policy, seed: int, slots_per_layer=None, num_slots: int = 14) -> list:
    """Admissions (demand and prefetch), hits, pins and the draft's predictions through a real cache: every
    admission's slot and victim, then the counts."""
    rng = random.Random(seed)
    layers = [0, 1, 2, 3]
    cache = ExpertCache(num_slots, 1, torch.float32, "cpu", policy, slots_per_layer)
    out, pinned = [], []
    for step in range(700):
        layer = rng.choice([0, 0, 1, 2, 3])  # uneven visits
        if isinstance(policy, SdLookaheadPolicy) and step % 5 == 0:
            policy.predict(step // 5, layers[(layers.index(layer) + 1) % 4], rng.sample(range(8), 3))
        for e in rng.sample(range(8), 3):
            _access(cache, (layer, e), rng, out, pinned, demand_p=0.85)
        _unpin_some(cache, rng, pinned, 6, 0.3)
        if rng.random() < 0.2:
            out.append(("sooner", cache.would_evict_sooner_needed((rng.choice(layers), rng.randrange(8)))))
    return out + [(cache.hits, cache.misses, cache.evictions)]


def test_expected_reuse_and_sd_lookahead_layer_heaps_name_the_listed_victims():
    """`victim_by_layer` (each layer's best key from its heap, then the best layer) names the victim the full
    scan over listed candidates names, through admissions, evictions, pins, prefetches and predictions."""
    layers = [0, 1, 2, 3]
    for seed in range(4):
        for fast, listed in ((ExpectedReusePolicy(layers), ListedExpectedReuse(layers)),
                             (SdLookaheadPolicy(layers), ListedSdLookahead(layers)),
                             (SdLookaheadPolicy(layers, discount=1.0), ListedSdLookahead(layers, discount=1.0))):
            a, b = _cache_trace(fast, seed), _cache_trace(listed, seed)
            assert a == b and sum(1 for x in a if len(x) == 3 and x[2] is not None) > 100  # evictions happened
        parts = {0: 4, 1: 3, 2: 3, 3: 4}
        assert _cache_trace(SdLookaheadPolicy(layers), seed, parts) == _cache_trace(ListedSdLookahead(layers), seed, parts)
