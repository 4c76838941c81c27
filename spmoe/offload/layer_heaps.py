"""
Layer heaps: per MoE layer, the resident keys of a cache in a min-heap by an eviction policy's
within-layer order, so a policy whose victim is "the best key of some layer" finds it in
O(layers x log slots) instead of scoring every resident key on every admission.

Terms: a key's *order* is a tuple the policy computes when the key's statistics change (a touch); an
*entry* is (order..., seq, key) with seq the key's residency rank (the order keys got their slots,
which breaks ties as the cache's candidate lists do). An entry is *live* while it is the key's latest
and the key is resident; older ones are skipped and dropped lazily.
Invariants: `best(layer, accept)` returns the smallest live entry of the layer whose key `accept`s
(keys it skips stay in the heap); a layer's heap holds at most twice its live entries plus a constant
(compacted on push).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from spmoe.types import ExpertKey

_SLACK = 32  # stale entries a heap may hold beyond its live ones before it is compacted


class LayerHeaps:
    def __init__(self):
        self._heaps: dict[int, list[tuple]] = {}
        self._live: dict[ExpertKey, tuple] = {}  # key -> its live entry
        self._seq_of: dict[ExpertKey, int] = {}  # resident key -> residency rank
        self._count: dict[int, int] = {}  # layer -> live entries
        self._seq = itertools.count()

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._live

    def seq(self, key: ExpertKey) -> int:
        return self._seq_of[key]

    def push(self, key: ExpertKey, order: tuple) -> None:
        """`key` is resident with this order (a new resident gets the next residency rank)."""
        seq = self._seq_of.get(key)
        if seq is None:
            seq = self._seq_of[key] = next(self._seq)
            self._count[key[0]] = self._count.get(key[0], 0) + 1
        entry = (*order, seq, key)
        self._live[key] = entry
        heap = self._heaps.setdefault(key[0], [])
        heapq.heappush(heap, entry)
        if len(heap) > 2 * self._count[key[0]] + _SLACK:
            heap[:] = [e for e in heap if self._live.get(e[-1]) is e]
            heapq.heapify(heap)

    def remove(self, key: ExpertKey) -> None:
        """`key` left the cache."""
        if self._live.pop(key, None) is not None:
            del self._seq_of[key]
            self._count[key[0]] -= 1

    def best(self, layer: int, accept: Callable[[ExpertKey], bool]) -> tuple | None:
        """The smallest live entry of `layer` whose key `accept` takes, or None."""
        heap, aside, found = self._heaps.get(layer, []), [], None
        live = self._live
        while heap:
            entry = heap[0]
            if live.get(entry[-1]) is not entry:
                heapq.heappop(heap)
                continue
            if accept(entry[-1]):
                found = entry
                break
            aside.append(heapq.heappop(heap))
        for entry in aside:
            heapq.heappush(heap, entry)
        return found
