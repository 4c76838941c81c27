"""
Expert slots that can no longer move: the device-side slot table of a cache that holds every expert.

When an `ExpertCache` holds every expert of the model (the GPU-resident reference, or any cache
with room for all that has loaded all), no miss can occur, so nothing is ever evicted and every
expert's slot is fixed for the rest of the run. Then a layer's routes can be mapped to slots on
the device (`slot_of[top_k_index]`) and its experts computed in one grouped matmul, with no
device->host sync (see `spmoe.models.experts.grouped_expert_mlp`).

Terms: E = experts per layer, S' = the slots of the layer's span (the smallest contiguous range
of slots holding its experts), N = elements per slot.
Invariants: a table is built only when every expert of every layer is resident; once built it is
never invalidated (nothing can be admitted, so nothing is evicted). Caches that may still evict
get None, and their experts are served one by one by the provider.
"""

from __future__ import annotations

import torch

from spmoe.models.experts import ExpertLayout
from spmoe.offload.cache import ExpertCache


class ResidentTable:
    def __init__(self, cache: ExpertCache, layout: ExpertLayout):
        self.cache = cache
        self.layout = layout
        self._possible = cache.num_slots >= len(layout.keys)
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(slot storage of the layer's span [S', N], slot of each expert within it [E] long, on the
        cache's device), or None while any expert of the model is not resident."""
        table = self._tables.get(layer)
        if table is not None or not self._possible:
            return table
        if len(self.cache.resident()) < len(self.layout.keys):
            return None
        slots = [self.cache.slot_of((layer, e)) for e in range(self.layout.num_experts)]
        lo, hi = min(slots), max(slots) + 1
        storage = self.cache.storage[lo:hi]  # [S', N] view
        slot_of = torch.tensor([s - lo for s in slots], dtype=torch.long, device=storage.device)  # [E]
        self._tables[layer] = table = (storage, slot_of)
        return table
