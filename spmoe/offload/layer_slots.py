"""
Layer slots: every routed expert of one MoE layer pinned in the cache at once, so the experts module
computes the layer in one grouped matmul over the cache's slot storage (`grouped_expert_mlp`).

Terms: E = experts per layer, S = cache slots, N = elements per slot; the layer's *span* = the
slots [lo, hi) from the lowest to the highest slot its routed experts occupy; `storage` = the
cache's storage over the span [hi - lo, N] (a view: the grouped matmul's groups are slots, and empty
groups still cost host time on the CPU); the *slot map* `slot_of` [E + 1] (long, on the cache's
device) gives each routed expert's slot relative to lo. Experts the layer does not route and entry
E (transformers' "no expert" sentinel) map to the *spare* slot: the lowest slot of the span no
routed expert occupies, else slot lo. No route reaches an unrouted expert; "no expert" rows (and
spmoe_plus's host-computed routes) are computed on the spare slot and then zeroed (or overwritten).
The spare lies inside the span, below a slot the cache has handed out, so it holds weights (the
cache hands its slots out lowest first and never frees one): no garbage reaches those rows. A spare
of its own keeps "no expert" rows out of the routed experts' groups, whose row counts (and so their
rounding) are then those of the per-expert path; sharing slot lo changes at most that group's
rounding, and only when the layer has "no expert" routes (adaptive gating).

A provider (`OnDemandProvider.serve_layer`, `PrefetchProvider.serve_layer`) looks up the hits, admits
and issues every miss's copy at once, and pins every routed expert. Only when all of them got a slot
in that one pass does it hand back a `LayerSlots`; else it hands back its per-expert iterator, which
carries on from the same cache state (so hit, miss and eviction counts are those of the per-expert
path either way).

Ordering invariants (as `spmoe.offload.provider.serve_in_order` keeps them per expert): before the
grouped matmul is enqueued, the compute stream waits on every slot's ready event (device-side waits,
the host does not block); after it, `release` records one free event on the compute stream for all
of the layer's slots (`TransferEngine.release_many`: copies into any of them wait on it) and then
drops the pins, so no slot can be handed to a copy before its free event exists. The slot map is built on the host from the
slots the provider chose and uploaded with one non-blocking copy from page-locked memory: no sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the experts module imports this one: keep it free of the offload stack
    from spmoe.offload.cache import ExpertCache
    from spmoe.offload.transfer import TransferEngine


class LayerSlots:
    """One layer's routed experts, pinned in `storage`; `release` once the grouped matmul is enqueued."""

    def __init__(self, ready: list[tuple[int, int]], num_experts: int, cache: ExpertCache, transfer: TransferEngine,
                 unpin: Callable[[int], None]):
        self.slots = [slot for _, slot in ready]
        self._transfer, self._unpin = transfer, unpin
        for slot in self.slots:
            transfer.wait_ready(slot)
        lo, hi, table = slot_map(ready, num_experts)
        self.storage = cache.storage[lo:hi]  # [hi - lo, N], the span
        cuda = self.storage.device.type == "cuda"  # page-locked, so the copy is truly asynchronous (no sync)
        host = torch.tensor(table, dtype=torch.long, pin_memory=cuda)  # [E + 1]
        self.slot_of = host.to(self.storage.device, non_blocking=True) if cuda else host

    def release(self) -> None:
        """The compute stream has enqueued its last read of every slot: free events, then unpin."""
        self._transfer.release_many(self.slots)
        for slot in self.slots:
            self._unpin(slot)
        self.slots = []


def slot_map(ready: list[tuple[int, int]], num_experts: int) -> tuple[int, int, list[int]]:
    """(lo, hi, slot map [E + 1] relative to lo) for the (expert, slot) pairs in `ready` (see the module
    docstring: the span [lo, hi) and its spare slot)."""
    used = {slot for _, slot in ready}
    lo, hi = (min(used), max(used) + 1) if used else (0, 1)
    spare = next((s for s in range(lo, hi) if s not in used), lo)
    table = [spare - lo] * (num_experts + 1)
    for e, slot in ready:
        table[e] = slot - lo
    return lo, hi, table
