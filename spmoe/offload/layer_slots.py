"""
Layer slots: every routed expert of one MoE layer pinned in the cache at once, so the experts module
computes the layer in one grouped matmul over the cache's slot storage (`grouped_expert_mlp`).

Terms: E = experts per layer, S = cache slots, N = elements per slot; a *slot map* `slot_of` [E + 1]
(long, on the cache's device) gives each routed expert's slot; experts the layer does not route and
entry E (transformers' "no expert" sentinel) point at the *spare* slot, the lowest slot no routed
expert of the layer occupies (slot 0 when every slot does). No route reaches an unrouted expert, and
"no expert" rows are zeroed by the grouped matmul; the spare slot keeps them out of the routed
experts' groups, whose row counts (and so their rounding) are then those of the per-expert path.

A provider (`OnDemandProvider.serve_layer`, `PrefetchProvider.serve_layer`) looks up the hits, admits
and issues every miss's copy at once, and pins every routed expert. Only when all of them got a slot
in that one pass does it hand back a `LayerSlots`; else it hands back its per-expert iterator, which
carries on from the same cache state (so hit, miss and eviction counts are those of the per-expert
path either way).

Ordering invariants (as `spmoe.offload.provider.serve_in_order` keeps them per expert): before the
grouped matmul is enqueued, the compute stream waits on every slot's ready event (device-side waits,
the host does not block); after it, `release` records every slot's free event on the compute stream
(copies into those slots wait on it) and drops the pins. The slot map is built on the host from the
slots the provider chose and uploaded with one non-blocking copy from page-locked memory: no sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # the experts module imports this one: keep it free of the offload stack
    from spmoe.offload.cache import ExpertCache
    from spmoe.offload.transfer import TransferEngine


class LayerSlots:
    """One layer's routed experts, pinned in `storage`; `release` once the grouped matmul is enqueued."""

    def __init__(self, ready: list[tuple[int, int]], num_experts: int, cache: ExpertCache, transfer: TransferEngine,
                 unpin: Callable[[int], None]):
        self.storage = cache.storage  # [S, N], the whole cache
        self.slots = [slot for _, slot in ready]
        self._transfer, self._unpin = transfer, unpin
        for slot in self.slots:
            transfer.wait_ready(slot)
        self.slot_of = slot_map(ready, num_experts, self.storage.shape[0], self.storage.device)  # [E + 1]

    def release(self) -> None:
        """The compute stream has enqueued its last read of every slot: free events, then unpin."""
        for slot in self.slots:
            self._transfer.release(slot)
            self._unpin(slot)
        self.slots = []


def slot_map(ready: list[tuple[int, int]], num_experts: int, num_slots: int, device: torch.device) -> torch.Tensor:
    """[E + 1] long on `device`: the slot of each (expert, slot) in `ready`, the spare slot elsewhere."""
    used = {slot for _, slot in ready}
    spare = next((s for s in range(min(len(used) + 1, num_slots)) if s not in used), 0)
    table = [spare] * (num_experts + 1)
    for e, slot in ready:
        table[e] = slot
    host = torch.tensor(table, dtype=torch.long)  # [E + 1]
    if device.type != "cuda":
        return host.to(device)
    # page-locked: the copy is truly asynchronous; the caching host allocator keeps the block until it lands
    return host.pin_memory().to(device, non_blocking=True)
