"""
Expert slots that can no longer move: the device-side slot table of a cache that holds every expert.

When an `ExpertCache` holds every expert of the model (the GPU-resident reference, or any cache
with room for all that has loaded all), no miss can occur, so nothing is ever evicted and every
expert's slot is fixed for the rest of the run. Then a layer's routes can be mapped to slots on
the device (`slot_of[top_k_index]`) and its experts computed in one grouped matmul, with no
device->host sync (see `spmoe.models.experts.grouped_expert_mlp`).

Terms: E = experts per layer, S' = the slots of the layer's span (the smallest contiguous range
of slots holding its experts), N = elements per slot. The table is the layer's slot map over all
its experts (`spmoe.offload.layer_slots.slot_map`, the one a provider's `LayerSlots` builds over its
routed experts): a layer whose span holds other layers' experts sends "no expert" routes (entry E)
to one of those (the spare), else to slot lo.
Invariants: a table is built only when every expert of every layer is resident; once built it is
never invalidated (nothing can be admitted, so nothing is evicted). Caches that may still evict
get None, and their experts are served one by one by the provider.
"""

from __future__ import annotations

import torch

from spmoe.models.experts import ExpertLayout
from spmoe.offload.cache import ExpertCache
from spmoe.offload.layer_slots import slot_map


class ResidentTable:
    def __init__(self, cache: ExpertCache, layout: ExpertLayout):
        self.cache = cache
        self.layout = layout
        self._possible = cache.num_slots >= len(layout.keys)
        self._spans: dict[int, tuple[int, int, torch.Tensor]] = {}  # layer -> (lo, hi, slot_of [E + 1])

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(slot storage of the layer's span [S', N], slot of each expert within it [E + 1] long, entry
        E = the spare for "no expert" routes, on the cache's device), or None while any expert of the
        model is not resident or the cache's storage is gone. Holds no reference to the storage."""
        span = self._spans.get(layer)
        if span is None:
            if not self._possible or len(self.cache.resident()) < len(self.layout.keys):
                return None
            ready = [(e, self.cache.slot_of((layer, e))) for e in range(self.layout.num_experts)]
            lo, hi, table = slot_map(ready, self.layout.num_experts)
            slot_of = torch.tensor(table, dtype=torch.long, device=self.cache.storage.device)  # [E + 1]
            self._spans[layer] = span = (lo, hi, slot_of)
        if self.cache.storage is None:
            return None
        lo, hi, slot_of = span
        return self.cache.storage[lo:hi], slot_of  # [S', N] view, [E + 1]
