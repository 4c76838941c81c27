"""The grouped expert path (spmoe.models.experts.grouped_expert_mlp, spmoe.runtime.resident): bit-identical
to the per-expert path on the CPU, used only when the cache holds every expert, and its deferred events
resolve to the same hits as the per-expert path records."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_run_config
from spmoe.config import MethodConfig
from spmoe.models import experts as experts_mod
from spmoe.models.experts import ExpertLayout, OffloadedExperts, grouped_expert_mlp, grouped_supported
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import make_policy
from spmoe.runtime.resident import ResidentTable
from spmoe.session import open_session
from spmoe.trace.records import ExpertEventLog

LAYOUT = ExpertLayout((0, 1), 6, 2, 32, 24, torch.float32)


class SlotProvider:
    def __init__(self, storage: torch.Tensor, slot_of: torch.Tensor):
        self.storage, self.slot_of = storage, slot_of

    def experts_for(self, layer, expert_ids, token_experts=None):
        for e in reversed(expert_ids):  # any order
            yield e, self.storage[int(self.slot_of[e])]


@pytest.mark.parametrize("num_tokens", [1, 3, 16])
def test_grouped_equals_per_expert_bitwise(num_tokens):
    torch.manual_seed(num_tokens)
    storage = torch.randn(9, LAYOUT.expert_numel)  # [S, N]
    slot_of = torch.tensor([5, 0, 3, 8, 7, 2])  # [E]
    experts = OffloadedExperts(0, LAYOUT, nn.SiLU(), SlotProvider(storage, slot_of))
    x = torch.randn(num_tokens, 32)
    index = torch.stack([torch.randperm(6)[:2] for _ in range(num_tokens)])  # [T, A]
    index[-1, 1] = 6  # transformers' "no expert" sentinel: a zero row
    grouped = grouped_expert_mlp(x, index, storage, slot_of, LAYOUT, experts.act_fn)
    assert torch.equal(grouped, experts._per_expert(x, index))
    assert torch.all(grouped[-1, 1] == 0) and grouped[-1, 0].abs().sum() > 0


def test_grouped_over_more_slots_than_one_grouped_gemm_takes(monkeypatch):
    """A layer's span in a large cache can exceed the 1023 groups CUDA's grouped GEMM takes (it checks
    group_count < 1024): chunked, same bits. The CPU kernel has no such limit, so the test plants it."""
    real = experts_mod._grouped_mm_fn()

    def limited(a, b, offs):
        assert offs.numel() < 1024, "Can't process more than 1024 groups"
        return real(a, b, offs=offs)

    monkeypatch.setattr(experts_mod, "_grouped_mm_fn", lambda: limited)
    torch.manual_seed(0)
    layout = ExpertLayout((0,), 6, 2, 8, 4, torch.float32)
    storage = torch.randn(2100, layout.expert_numel)  # [S, N]
    slot_of = torch.tensor([2099, 3, 1024, 1023, 2048, 700])  # [E]: slots in three chunks
    x = torch.randn(5, 8)
    index = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 6], [3, 2]])  # [T, A]
    experts = OffloadedExperts(0, layout, nn.SiLU(), SlotProvider(storage, slot_of))
    grouped = grouped_expert_mlp(x, index, storage, slot_of, layout, experts.act_fn)
    assert torch.equal(grouped, experts._per_expert(x, index))


def test_resident_table_only_when_every_expert_is_resident():
    cache = ExpertCache(12, LAYOUT.expert_numel, torch.float32, "cpu", make_policy("lru", LAYOUT.moe_layers))
    table = ResidentTable(cache, LAYOUT)
    for key in LAYOUT.keys[:-1]:
        cache.admit(key)
    assert table.get(0) is None  # one expert of layer 1 missing: layer 0 could still see evictions
    cache.admit(LAYOUT.keys[-1])
    storage, slot_of = table.get(1)
    for e in range(6):
        assert storage[slot_of[e]].data_ptr() == cache.slot(cache.slot_of((1, e))).data_ptr()
    small = ResidentTable(ExpertCache(11, LAYOUT.expert_numel, torch.float32, "cpu", make_policy("lru")), LAYOUT)
    assert small.get(0) is None


def test_deferred_events_resolve_in_order():
    log = ExpertEventLog()
    log.record(0, [1], [1], [])
    log.record_routes(1, torch.tensor([[4, 2], [2, 6]]), 6)  # 6 = no expert
    log.record(2, [0], [], [0])
    events = log.drain()
    assert [(e.layer, e.needed, e.hits, e.misses) for e in events] == [(0, [1], [1], []), (1, [2, 4], [2, 4], []),
                                                                       (2, [0], [], [0])]
    assert log.drain() == []


def test_gpu_resident_uses_the_grouped_path_and_matches_per_expert():
    cfg = tiny_run_config(num_prompts=2, max_new_tokens=6)
    cfg.model.weights = "random"
    s = open_session(cfg)
    try:
        gens, _, _ = s.generate(MethodConfig(name="gpu_resident"), s.cfg.hardware, 6)
        OffloadedExperts.grouped = False
        loop, _, _ = s.generate(MethodConfig(name="gpu_resident"), s.cfg.hardware, 6)
    finally:
        OffloadedExperts.grouped = True
        s.close()
    assert grouped_supported(torch.zeros(1))  # the probe passed: the first run took the grouped path
    assert [g.token_ids for g in gens] == [g.token_ids for g in loop]
    flat = lambda gs: [(e.layer, e.needed, e.hits, e.misses) for g in gs for r in g.records for e in r.layers]  # noqa: E731
    assert flat(gens) == flat(loop)
