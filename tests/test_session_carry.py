"""What a session carries from one run of a method configuration to the next: the reserve its precaptured graphs
needed, and the method's own memory (`MethodContext.memory`, e.g. spmoe_plus's host gate).

A run whose precaptured graphs would pass the budget is rebuilt with that overrun added to its reserve (fewer expert
slots); later runs of the same method, card and draft length start from it; methods that do not offload, or a
reserve the budget cannot plan, run as built. The overrun itself (`projected_overrun_bytes`) needs CUDA, so these
tests feed it."""

from __future__ import annotations

import pytest

import spmoe.session as session_mod
from dataclasses import replace

from conftest import open_with_reference, tiny_run_config
from experiments.presets import load_preset
from spmoe.config import MethodConfig


@pytest.fixture(scope="module")
def session():
    cfg = tiny_run_config(num_prompts=2, max_new_tokens=8)
    s = open_with_reference(cfg, cfg.max_new_tokens)
    whole = s.plan(cfg.hardware, "lru_nosd")  # the CPU: no budget, a slot for every expert
    need = whole.non_expert_bytes + whole.kv_bytes + whole.activation_bytes + 16.5 * whole.expert_bytes
    s.card = replace(load_preset("hardware", "tiny_card"), gpu_budget_gib=need / 2**30)  # 16 slots
    yield s
    s.close()


def _feed(monkeypatch, overruns: list[int]) -> list[int]:
    """Make the projected overrun return `overruns` in turn (then 0); returns the slot counts it saw."""
    seen = []

    def fake(device, plan, allocated_at_start_bytes, resident_bytes):
        seen.append(plan.num_slots)
        return overruns.pop(0) if overruns else 0

    monkeypatch.setattr(session_mod, "projected_overrun_bytes", fake)
    return seen


def test_overrun_rebuilds_with_fewer_slots_and_is_remembered(session, monkeypatch):
    expert_bytes = session.target.layout.expert_bytes
    method = MethodConfig(name="lru_nosd")
    base = session.plan(session.card, "lru_nosd").num_slots
    assert base == 16
    seen = _feed(monkeypatch, [int(1.5 * expert_bytes)])
    gens, plan, _ = session.generate(method, session.card, 8)
    assert seen == [base, base - 1]  # room for 16.5 slots, 1.5 experts' bytes more reserve: 15
    assert plan.num_slots == base - 1
    assert plan.reserve_bytes == int(1.5 * expert_bytes)  # tiny_card plans no reserve of its own
    assert session.last_extra["capture_reserve_bytes"] == int(1.5 * expert_bytes)
    assert [g.token_ids for g in gens] == session.reference

    gens, plan, _ = session.generate(method, session.card, 8)  # remembered: one build
    assert seen == [base, base - 1, base - 1] and plan.num_slots == base - 1
    assert [g.token_ids for g in gens] == session.reference

    other = session.generate(MethodConfig(name="lru_nosd", eviction="lfu"), session.card, 8)[1]
    assert other.num_slots == base  # another method config does not inherit it


def test_rebuilds_are_bounded(session, monkeypatch):
    seen = _feed(monkeypatch, [1, 1, 1, 1, 1])
    session.generate(MethodConfig(name="lru_nosd", eviction="expected_reuse"), session.card, 8)
    assert len(seen) == session_mod.CAPTURE_FIT_ATTEMPTS + 1


def test_no_rebuild_where_the_cache_cannot_shrink(session, monkeypatch):
    seen = _feed(monkeypatch, [10**12])  # more reserve than the budget can plan: runs as built
    gens, plan, _ = session.generate(MethodConfig(name="lru_nosd", eviction="layer_distance"),
                                     session.card, 8)
    assert len(seen) == 1 and [g.token_ids for g in gens] == session.reference
    seen = _feed(monkeypatch, [1])
    session.generate(MethodConfig(name="gpu_resident"), replace(session.card, gpu_budget_gib=None), 8)
    assert len(seen) == 1  # gpu_resident keeps every expert: nothing to give up


def test_a_method_keeps_its_memory_across_runs_of_one_configuration(session):
    from spmoe.config import PlusConfig

    plus = MethodConfig(name="spmoe_plus", plus=PlusConfig(draft_precision="none", host_compute="auto", host_threads=1))
    carried = []
    for method in (plus, plus, replace(plus, plus=replace(plus.plus, host_threads=2))):
        session.generate(method, session.card, 8)
        carried.append(session.last_extra["host_gate_carried_samples"])
    decode_steps = 2 * 7  # two prompts, 8 tokens: the prefill emits the first
    assert carried == [0, decode_steps, 0]  # the second run starts from the first's gate; another config does not
