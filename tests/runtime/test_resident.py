"""The resident slot table (`spmoe.runtime.resident.ResidentTable`) is the layer slot map
(`spmoe.offload.layer_slots.slot_map`) over all of a layer's experts: the same span, the same slots and
the same spare for "no expert" routes, also when other layers' experts sit inside the span."""

from __future__ import annotations

import torch

from spmoe.models.experts import ExpertLayout
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import make_policy
from spmoe.offload.layer_slots import slot_map
from spmoe.runtime.resident import ResidentTable

LAYOUT = ExpertLayout((0, 1), 6, 2, 8, 4, torch.float32)  # 2 MoE layers x 6 experts


def _resident(keys) -> tuple[ExpertCache, ResidentTable]:
    cache = ExpertCache(len(LAYOUT.keys), LAYOUT.expert_numel, torch.float32, "cpu", make_policy("lru"))
    for key in keys:
        cache.preload(key)
    return cache, ResidentTable(cache, LAYOUT)


def _check(cache: ExpertCache, table: ResidentTable, layer: int) -> list[int]:
    storage, slot_of = table.get(layer)
    ready = [(e, cache.slot_of((layer, e))) for e in range(LAYOUT.num_experts)]
    lo, hi, expected = slot_map(ready, LAYOUT.num_experts)
    assert slot_of.tolist() == expected and storage.shape[0] == hi - lo
    assert storage.data_ptr() == cache.slot(lo).data_ptr()
    for e, slot in ready:
        assert storage[slot_of[e]].data_ptr() == cache.slot(slot).data_ptr()
    return slot_of.tolist()


def test_contiguous_layers_send_no_expert_routes_to_slot_lo():
    cache, table = _resident(LAYOUT.keys)  # layer 0 in slots 0..5, layer 1 in 6..11
    assert _check(cache, table, 0) == [0, 1, 2, 3, 4, 5, 0]
    assert _check(cache, table, 1) == [0, 1, 2, 3, 4, 5, 0]


def test_interleaved_layers_send_no_expert_routes_to_the_spare():
    keys = [(layer, e) for e in range(6) for layer in (0, 1)]  # layer 0 in even slots, layer 1 in odd ones
    cache, table = _resident(keys)
    assert _check(cache, table, 0) == [0, 2, 4, 6, 8, 10, 1]  # span 0..10, spare = slot 1 (layer 1's expert 0)
    assert _check(cache, table, 1) == [0, 2, 4, 6, 8, 10, 1]  # span 1..11, spare = slot 2
