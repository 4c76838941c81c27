"""experiments.eviction_sim: the demand access sequence of a hand-made trace and policy misses on it."""

from __future__ import annotations

from test_accuracy import _trace

from experiments.eviction_sim import demand_accesses, policy_misses
from spmoe.offload.eviction import POLICIES

F, T = False, True
# prefill (not counted), then per verify row and layer the sorted union of its positions' experts
# (the sentinel 4 = "no expert" is skipped)
EXPECTED = [((0, 0), F), ((0, 1), F), ((1, 1), F), ((1, 2), F),
            ((0, 0), T), ((0, 1), T), ((0, 2), T), ((0, 3), T), ((1, 0), T), ((1, 1), T), ((1, 2), T), ((1, 3), T),
            ((0, 0), T), ((0, 1), T), ((0, 3), T), ((1, 0), T), ((1, 1), T), ((1, 3), T)]


def test_demand_accesses_are_per_row_unions_in_layer_order():
    assert demand_accesses(_trace(), 2) == EXPECTED


def test_demand_accesses_follow_the_replay_layer_map():
    acc = demand_accesses(_trace(), 4)  # m(l) = floor(l * 2 / 4): target layers 0, 1 read trace layer 0
    first_row = [key for key, counted in acc if counted][:16]
    assert [e for (l, e) in first_row if l == 0] == [e for (l, e) in first_row if l == 1] == [0, 1, 2, 3]


def test_policy_misses():
    acc = demand_accesses(_trace(), 2)
    for policy in POLICIES:  # everything fits: only the 4 experts first seen after prefill miss
        assert policy_misses(acc, 8, policy, 2) == 4
    assert policy_misses(acc, 3, "lru", 2) == 14  # 3 slots against unions of 4 and 3: LRU misses every access


def test_demand_accesses_without_sd_walk_the_committed_tokens():
    # row 1 accepted 1 draft: positions 2 and 3 one at a time; row 2 accepted 0: position 5 only
    assert demand_accesses(_trace(), 2, speculative=False) == EXPECTED[:4] + [
        ((0, 0), T), ((0, 2), T), ((1, 1), T),
        ((0, 2), T), ((0, 3), T), ((1, 2), T), ((1, 3), T),
        ((0, 1), T), ((0, 3), T), ((1, 0), T), ((1, 3), T)]
