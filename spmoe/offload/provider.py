"""
OnDemandProvider: the ExpertProvider of every offloading method without prefetch.

For one layer's routed experts: hits are pinned first; then the misses are admitted and all
their copies are issued at once (batched on the copy stream), so the copy of expert j+1
overlaps the compute of expert j. Experts are yielded hits first, then misses in issue order;
each is released (its free event recorded, its pin dropped) when the consumer resumes. If the
cache has fewer free slots than misses, the remaining misses are issued as slots are released,
so any cache with at least one slot makes progress.

`serve_layer` is the same service for one grouped matmul per layer: when every miss got a slot in
the first issue pass (all of the layer's experts pinned at once), it returns a
`spmoe.offload.layer_slots.LayerSlots` instead of yielding experts one by one; otherwise the
per-expert iterator, carrying on from the same state. Either way the lookups, admissions (so the
victims) and events are those of `experts_for`.

Every layer's needed/hit/miss lists go to the `ExpertEventLog`. When the cache holds every expert
(nothing can be evicted), `serve_resident` hands the experts module the device slot table instead,
for one grouped matmul per layer without a host sync.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

import torch

from spmoe.offload.cache import ExpertCache
from spmoe.offload.layer_slots import LayerSlots, SlotTables
from spmoe.offload.store import ExpertStore
from spmoe.offload.transfer import TransferEngine
from spmoe.runtime.resident import ResidentTable
from spmoe.trace.records import ExpertEventLog


class OnDemandProvider:
    def __init__(self, cache: ExpertCache, store: ExpertStore, transfer: TransferEngine, events: ExpertEventLog):
        self.cache = cache
        self.store = store
        self.transfer = transfer
        self.events = events
        self.resident = ResidentTable(cache, store.layout)
        self.tables = slot_tables(cache, store.layout.num_experts)

    def serve_resident(self, layer: int, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """When the cache holds every expert for good: the layer's slot table (`ResidentTable.get`), with
        its events recorded from the device routes (all hits, resolved when the step's events are
        drained). Else None: serve through `experts_for`."""
        table = self.resident.get(layer)
        if table is not None:
            self.events.record_routes(layer, top_k_index, self.store.layout.num_experts)
        return table

    def experts_for(self, layer: int, expert_ids: list[int], token_experts: torch.Tensor | None = None,
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        ready, pending, issue = self._open(layer, expert_ids)
        yield from serve_in_order(ready, issue, self.cache, self.transfer, self.cache.unpin, pending)

    def serve_layer(self, layer: int, expert_ids: list[int], token_experts: torch.Tensor | None = None,
                    ) -> LayerSlots | Iterator[tuple[int, torch.Tensor]]:
        """The layer's experts all pinned (`LayerSlots`), or the `experts_for` iterator when the misses
        outnumber the slots that can be freed at once."""
        ready, pending, issue = self._open(layer, expert_ids)
        return serve_layer(ready, pending, issue, self.cache, self.transfer, self.cache.unpin,
                           self.store.layout.num_experts, layer, self.tables)

    def _open(self, layer: int, expert_ids: list[int]) -> tuple[deque[tuple[int, int]], deque[int], Callable[[], None]]:
        """Look up and pin the hits, record the layer's events: (ready (expert, slot), pending misses, issue)."""
        cache, transfer = self.cache, self.transfer
        ready: deque[tuple[int, int]] = deque()  # (expert, slot), in yield order
        pending: deque[int] = deque()
        hits, misses = [], []
        for e in expert_ids:
            slot = cache.lookup((layer, e))
            if slot is None:
                pending.append(e)
                misses.append(e)
            else:
                cache.pin(slot)
                ready.append((e, slot))
                hits.append(e)
        self.events.record(layer, list(expert_ids), hits, misses)

        def issue() -> None:
            while pending and cache.can_admit((layer, pending[0])):
                e = pending.popleft()
                slot, _ = cache.admit((layer, e))
                cache.pin(slot)
                transfer.load(slot, cache.slot(slot), self.store.flat((layer, e)))
                ready.append((e, slot))

        return ready, pending, issue


def slot_tables(cache: ExpertCache, num_experts: int) -> SlotTables | None:
    """The device slot-map rows of a cache on CUDA (`spmoe.offload.layer_slots.SlotTables`), else None."""
    return SlotTables(num_experts, cache.storage.device) if cache.storage.device.type == "cuda" else None


def serve_layer(ready: deque[tuple[int, int]], pending: deque[int], issue: Callable[[], None], cache: ExpertCache,
                transfer: TransferEngine, unpin: Callable[[int], None], num_experts: int, layer: int = -1,
                tables: SlotTables | None = None) -> LayerSlots | Iterator[tuple[int, torch.Tensor]]:
    """Run `issue` once; if every miss got a slot, the layer's `LayerSlots`, else `serve_in_order`'s
    iterator (its first `issue` finds the same state, so nothing is admitted twice)."""
    issue()
    if pending:
        return serve_in_order(ready, issue, cache, transfer, unpin, pending)
    return LayerSlots(list(ready), num_experts, cache, transfer, unpin, layer, tables)


def serve_in_order(ready: deque[tuple[int, int]], issue: Callable[[], None], cache: ExpertCache,
                   transfer: TransferEngine, unpin: Callable[[int], None], pending: deque[int],
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (expert, slot weights) from `ready` in order; when the consumer resumes, release the
    slot (free event) and unpin it, then let `issue` start loads that now have a free slot. Misses
    still `pending` when nothing is left to release could never get a slot (every slot pinned): an error."""
    issue()
    while ready:
        e, slot = ready.popleft()
        transfer.wait_ready(slot)
        yield e, cache.slot(slot)
        transfer.release(slot)
        unpin(slot)
        issue()
    if pending:
        raise RuntimeError(f"{len(pending)} experts {list(pending)} could not get a slot (all pinned)")
