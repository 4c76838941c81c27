"""The memory plan's slot cap (`spmoe.offload.budget.capped_slots`), which every method's cache size goes through."""

from __future__ import annotations

from spmoe.offload.budget import capped_slots


def test_capped_slots_takes_the_smaller_of_plan_and_cap():
    assert capped_slots(40, None) == 40  # no cap: every slot the plan leaves
    assert capped_slots(40, 12) == 12
    assert capped_slots(12, 40) == 12  # a cap above the plan never adds slots
