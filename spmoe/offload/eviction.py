"""
Eviction policies for the GPU expert cache: pure bookkeeping over ExpertKeys, no tensors.

A policy sees every access (`touch`), every insertion and every eviction of the cache it
serves, and names a victim among the evictable resident keys. Terms:
- LRU: evict the least recently used resident key.
- LFU: evict the resident key with the fewest accesses over the whole run (counts survive
  eviction, so a popular expert that was evicted comes back with its history); ties go to
  the least recently used.
- layer_distance: decoding visits the MoE layers cyclically, so the resident expert needed
  farthest in the future is the one whose layer comes back last: evict the key with the
  largest distance (k.layer - current - 1) mod L, where `current` is the layer of the latest
  access; ties go to LFU then LRU. This is Belady's rule with the layer cycle standing in for
  perfect foresight (beyond the paper, which uses LRU).
- expected_reuse: Belady's rule with the next use *estimated*. Let n = number of MoE layers, a
  *visit* of layer l = one forward's accesses to it, V_l = visits so far, u_k = visits that used
  key k, q_k = (u_k + 1) / (V_l + 2) its (smoothed) chance of being used at a visit, and
  d_k = (k.layer - current - 1) mod n the layers until its layer's next visit. With visits
  independent, the next use of k is E[next use] = d_k + n (1 / q_k - 1) layer visits away; evict
  the largest. It weighs layer distance against frequency instead of ordering them (beyond the
  paper). On recorded routing it moves fewer bytes than layer_distance for on-demand access, but
  not under spmoe's prefetch (`experiments.eviction_sim`, `results/real_pair/eviction`).
`touch(key, demand)`: `demand=False` marks a prefetch or preload admission, which is not a use;
only expected_reuse distinguishes it (the other policies keep their measured behaviour). Only
expected_reuse has `needed_before(resident, incoming)`, with which a prefetch that would evict a
key needed sooner is dropped (`ExpertCache.would_evict_sooner_needed`).
Invariant: `victim(candidates)` returns one of `candidates` and never mutates state. LRU also has
`victim_where(evictable)`: the least recently touched key for which `evictable` holds (its keys are
kept in touch order, so the scan stops at the first), the key `victim` names among the keys it has
seen; a cache whose resident keys have all been touched uses it instead of listing candidates.
layer_distance also has `victim_by_layer(resident_by_layer, evictable)`: its distance ranks first and
differs between layers, so it scores only the farthest layer that has an evictable key, the key
`victim` names over all of them. expected_reuse (and sd_lookahead) have one too: within a layer their
rank is a static order of the keys' own statistics, so each layer's best key comes from a heap of its
resident keys (`spmoe.offload.layer_heaps`, fed by `touch` and `on_evict`) and only those are scored.
A subclass that overrides `victim` must drop these shortcuts.
Threads: policies take no lock. A policy is called only through its cache, and a cache shared by
threads is called under its owner's lock (`PrefetchProvider.lock`, held for every call of the
prefetch worker and of verification), so no scan of a policy's dicts (LRU's touch order) overlaps
a touch; `sd_lookahead`'s `observe` is the one call meant for any thread.
"""

from __future__ import annotations

import importlib

from collections import Counter
from typing import Callable, Iterable, Protocol

from spmoe.offload.layer_heaps import LayerHeaps
from spmoe.types import ExpertKey


class EvictionPolicy(Protocol):
    def touch(self, key: ExpertKey, demand: bool = True) -> None: ...
    def on_evict(self, key: ExpertKey) -> None: ...
    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey: ...


class LruPolicy:
    def __init__(self) -> None:
        self._clock = 0
        self._last_use: dict[ExpertKey, int] = {}  # in touch order: oldest first

    def touch(self, key: ExpertKey, demand: bool = True) -> None:
        self._clock += 1
        self._last_use.pop(key, None)
        self._last_use[key] = self._clock

    def on_evict(self, key: ExpertKey) -> None:
        self._last_use.pop(key, None)

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        return min(candidates, key=lambda k: self._last_use.get(k, 0))

    def victim_where(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """The least recently touched key with `evictable(key)`, None if there is none."""
        return next((k for k in self._last_use if evictable(k)), None)


class LfuPolicy:
    def __init__(self) -> None:
        self._clock = 0
        self._last_use: dict[ExpertKey, int] = {}
        self._count: Counter[ExpertKey] = Counter()

    def touch(self, key: ExpertKey, demand: bool = True) -> None:
        self._clock += 1
        self._last_use[key] = self._clock
        self._count[key] += 1

    def on_evict(self, key: ExpertKey) -> None:
        pass  # counts are kept: frequency is a property of the expert, not of its residency

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        count, last_use = self._count, self._last_use
        return min(candidates, key=lambda k: (count[k], last_use.get(k, 0)))


class LayerDistancePolicy(LfuPolicy):
    def __init__(self, moe_layers: Iterable[int]):
        super().__init__()
        self._order = {layer: i for i, layer in enumerate(moe_layers)}
        self._current = len(self._order) - 1

    def touch(self, key: ExpertKey, demand: bool = True) -> None:
        super().touch(key)
        self._current = self._order.get(key[0], self._current)

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        n, order, current, count, last_use = len(self._order), self._order, self._current, self._count, self._last_use
        return max(candidates, key=lambda k: ((order[k[0]] - current - 1) % n, -count[k], -last_use.get(k, 0)))

    def victim_by_layer(self, resident_by_layer: dict[int, Iterable[ExpertKey]],
                        evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """`victim` over the evictable keys of `resident_by_layer` (layer -> keys), farthest layer first;
        None if no key is evictable."""
        n, order, current = len(self._order), self._order, self._current
        for layer in sorted(resident_by_layer, key=lambda layer: (order[layer] - current - 1) % n, reverse=True):
            candidates = [k for k in resident_by_layer[layer] if evictable(k)]
            if candidates:
                return self.victim(candidates)
        return None


class ExpectedReusePolicy:
    def __init__(self, moe_layers: Iterable[int]):
        self._order = {layer: i for i, layer in enumerate(moe_layers)}
        self._current = len(self._order) - 1
        self._visits = [0] * len(self._order)  # V_l
        self._uses: Counter[ExpertKey] = Counter()  # u_k
        self._last_visit: dict[ExpertKey, int] = {}
        self._heaps = LayerHeaps()  # resident keys per layer, by `_within_layer` (for `victim_by_layer`)

    def touch(self, key: ExpertKey, demand: bool = True) -> None:
        if (self._count_use(key, demand) or key not in self._heaps) and key[0] in self._order:
            self._heaps.push(key, self._within_layer(key))

    def _count_use(self, key: ExpertKey, demand: bool) -> bool:
        """Update the visit and use counts for a touch; whether `key`'s own statistics changed."""
        i = self._order.get(key[0])
        if not demand or i is None:
            return False
        if i != self._current:
            self._current = i
            self._visits[i] += 1
        if self._last_visit.get(key) != self._visits[i]:
            self._uses[key] += 1
            self._last_visit[key] = self._visits[i]
            return True
        return False

    def _within_layer(self, key: ExpertKey) -> tuple:
        """Orders a layer's keys as `victim` ranks them there, best victim first: fewest uses, then oldest."""
        return self._uses[key], self._last_visit.get(key, 0)

    def on_evict(self, key: ExpertKey) -> None:
        self._heaps.remove(key)  # use counts are kept: they estimate the expert's routing frequency

    def victim_by_layer(self, resident_by_layer: dict[int, Iterable[ExpertKey]],
                        evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """`victim` over the evictable keys of `resident_by_layer` (layer -> keys), from each layer's best
        key only (`LayerHeaps`); None if no key is evictable."""
        best, best_key = None, None
        for layer, keys in resident_by_layer.items():
            found = self._layer_best(layer, lambda k, keys=keys: k in keys and evictable(k))
            if found is not None and (best is None or found[0] > best):
                best, best_key = found[0], found[1]
        return best_key

    def _layer_best(self, layer: int, accept: Callable[[ExpertKey], bool]) -> tuple | None:
        """`_ranked` of the layer's best victim among the keys `accept` takes (None if there is none)."""
        entry = self._heaps.best(layer, accept)
        return None if entry is None else self._ranked(entry[-1])

    def _ranked(self, key: ExpertKey) -> tuple:
        """((rank as in `victim`, -residency rank), key): the larger, the better the victim."""
        return ((self.next_use(key), -self._last_visit.get(key, 0)), -self._heaps.seq(key)), key

    def next_use(self, key: ExpertKey) -> float:
        """Estimated layer visits until `key` is used again (the docstring's d_k + n (1/q_k - 1))."""
        n, i = len(self._order), self._order[key[0]]
        q = (self._uses[key] + 1) / (self._visits[i] + 2)
        return (i - self._current - 1) % n + n * (1 / q - 1)

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        """The candidate with the farthest `next_use` (then the oldest last visit; the first such in
        `candidates`): `next_use`'s arithmetic inlined over per-layer constants, since a large cache
        scores every evictable key on every admission."""
        n, order, cur = len(self._order), self._order, self._current
        dist = [(i - cur - 1) % n for i in range(n)]
        den = [v + 2 for v in self._visits]
        uses, last = self._uses, self._last_visit
        best, best_key = None, None
        for k in candidates:
            i = order[k[0]]
            rank = (dist[i] + n * (1 / ((uses[k] + 1) / den[i]) - 1), -last.get(k, 0))
            if best is None or rank > best:
                best, best_key = rank, k
        return best_key

    def needed_before(self, resident: ExpertKey, incoming: ExpertKey) -> bool:
        """Whether `resident` is expected to be used before `incoming`, a prefetch predicted for its
        layer's next visit (next use d_incoming, q = 1)."""
        n = len(self._order)
        return self.next_use(resident) < (self._order[incoming[0]] - self._current - 1) % n


POLICIES = {"lru": LruPolicy, "lfu": LfuPolicy, "layer_distance": LayerDistancePolicy,
            "expected_reuse": ExpectedReusePolicy}
LAYER_AWARE = ("layer_distance", "expected_reuse")  # built from the model's MoE layer order


def register_policy(name: str, cls: type, layer_aware: bool = False) -> None:
    """Add a policy defined in its own module under `name` (`layer_aware`: built from the MoE layer order)."""
    global LAYER_AWARE
    if name in POLICIES:
        raise ValueError(f"eviction policy {name!r} registered twice")
    POLICIES[name] = cls
    if layer_aware:
        LAYER_AWARE = (*LAYER_AWARE, name)


_OWN_MODULES = ("spmoe.offload.eviction_lookahead",)  # policies that register themselves from their own module


def policy_names() -> list[str]:
    """Every eviction policy, including those registered from their own modules (imported here, so
    the set never depends on what the caller happened to import first)."""
    for module in _OWN_MODULES:
        importlib.import_module(module)
    return sorted(POLICIES)


def make_policy(name: str, moe_layers: Iterable[int] = ()) -> EvictionPolicy:
    if name not in policy_names():
        raise ValueError(f"unknown eviction policy {name!r}; valid: {policy_names()}")
    return POLICIES[name](moe_layers) if name in LAYER_AWARE else POLICIES[name]()
