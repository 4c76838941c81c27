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

`view(whole)` hands the experts module (storage, slot map). On the CPU: the span and the map relative
to lo. On CUDA the map lives in the layer's row of `SlotTables` (one page-locked host row and one device
row per layer, allocated once: static addresses, so a CUDA graph of the layer's expert kernels captured
once reads each step's map). `whole=True` (the Triton kernels, which work per route, not per slot)
gives the cache's whole storage and absolute slots, so the storage address is static too, and writes
only the routed experts' entries, uploading the row only when one of them changed (a layer whose
experts all stayed where they were uploads nothing). Its other entries keep earlier values, slots of
the storage that may now hold other weights: the kernels read only routed experts' entries ("no
expert" routes are zero rows without a lookup), so `whole=True` requires every routed expert of the
layer in `ready` (spmoe_plus's layers, whose host-computed experts are routed but not served, use the
span). A host row is rewritten only after its previous upload has completed (an event per row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the experts module imports this one: keep it free of the offload stack
    from spmoe.offload.cache import ExpertCache
    from spmoe.offload.transfer import TransferEngine


class SlotTables:
    """Per MoE layer, a host row (page-locked on CUDA) and a device row [E + 1] (long) holding its slot map."""

    def __init__(self, num_experts: int, device: torch.device):
        self.num_experts, self.device = num_experts, device
        self.num_uploads = 0
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor, object]] = {}

    def _row(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, object]:
        row = self._rows.get(layer)
        if row is None:
            cuda = self.device.type == "cuda"
            row = self._rows[layer] = (torch.zeros(self.num_experts + 1, dtype=torch.long, pin_memory=cuda),
                                       torch.zeros(self.num_experts + 1, dtype=torch.long, device=self.device),
                                       torch.cuda.Event() if cuda else None)
        return row

    def _send(self, host: torch.Tensor, dev: torch.Tensor, copied) -> None:
        dev.copy_(host, non_blocking=True)
        if copied is not None:
            copied.record(torch.cuda.current_stream(dev.device.index))
        self.num_uploads += 1

    def upload(self, layer: int, table: list[int]) -> torch.Tensor:
        """The layer's device row [E + 1] after a non-blocking copy of `table` into it (compute stream)."""
        host, dev, copied = self._row(layer)
        if copied is not None:
            copied.synchronize()  # the row's previous upload has read the host row (long done: a step ago)
        host.numpy()[:] = table
        self._send(host, dev, copied)
        return dev

    def update(self, layer: int, ready: list[tuple[int, int]]) -> torch.Tensor:
        """The layer's device row with entry e = slot for every (e, slot) in `ready`, absolute; uploaded only
        when one of those entries changed (see the module docstring for the others)."""
        host, dev, copied = self._row(layer)
        values = host.numpy()
        changed = [(e, slot) for e, slot in ready if values[e] != slot]
        if changed:
            if copied is not None:
                copied.synchronize()
            for e, slot in changed:
                values[e] = slot
            self._send(host, dev, copied)
        return dev


class LayerSlots:
    """One layer's routed experts, pinned in the cache; `view` for the grouped matmul, then `release` once
    it is enqueued."""

    def __init__(self, ready: list[tuple[int, int]], num_experts: int, cache: ExpertCache, transfer: TransferEngine,
                 unpin: Callable[[int], None], layer: int = -1, tables: SlotTables | None = None):
        self.ready, self.slots = ready, [slot for _, slot in ready]
        self.num_experts, self.layer, self._cache, self._tables = num_experts, layer, cache, tables
        self._transfer, self._unpin = transfer, unpin
        for slot in self.slots:
            transfer.wait_ready(slot)

    @property
    def static(self) -> bool:
        """Whether `view(whole=True)` gives static addresses (storage and the layer's device row): with
        `SlotTables`, which providers keep on CUDA only."""
        return self._tables is not None

    def view(self, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(storage [S', N], slot map [E + 1] on the cache's device): the span and slots relative to its
        lo; with `whole` and `SlotTables`, the cache's whole storage and absolute slots (see the module
        docstring)."""
        storage = self._cache.storage
        if self._tables is not None and whole:
            return storage, self._tables.update(self.layer, self.ready)
        lo, hi, table = slot_map(self.ready, self.num_experts)
        if self._tables is None:
            return storage[lo:hi], torch.tensor(table, dtype=torch.long, device=storage.device)
        return storage[lo:hi], self._tables.upload(self.layer, table)

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
