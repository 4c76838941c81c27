"""Cutoff layer L* of the latency model on hand-computed profiles."""

from __future__ import annotations

import pytest

from spmoe.config import CutoffConfig
from spmoe.policy.cutoff import Profile, choose_cutoff, cutoff_layer, expected_union


def test_expected_union():
    assert expected_union(8, 2, 1) == pytest.approx(2.0)
    assert expected_union(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))  # 3.5


def test_hand_computed_cutoff():
    # E=8, A=2, k=1, empty cache (S small vs L*E): n = 2 * (1 - 16/(4*8)) = 1
    p = Profile(draft_layer_ms=1.0, verify_layer_ms=2.0, expert_load_ms=3.0, num_layers=4, num_experts=8, top_k=2,
                num_slots=16)
    # C(0)=1+3=4 <= V(0)=4 ; C(1)=max(4,2)+3=7 > V(1)=6  -> L*=0
    assert cutoff_layer(p, 1) == 0
    # faster copies: t_e=1: C = 2,3,4,5 vs V = 4,6,8,10 -> all land; memory: (l+1)*1 <= 14 -> L*=3
    assert cutoff_layer(Profile(1.0, 2.0, 1.0, 4, 8, 2, 16), 1) == 3
    # memory-bound: S=4 -> n = 2*(1-4/32)=1.75; (l+1)*1.75 <= 2 -> only l=0
    assert cutoff_layer(Profile(1.0, 2.0, 0.1, 4, 8, 2, 4), 1) == 0
    # copies slower than the whole draft: nothing lands -> -1
    assert cutoff_layer(Profile(0.1, 0.1, 10.0, 4, 8, 2, 16), 1) == -1


def test_modes():
    p = Profile(1.0, 2.0, 3.0, 4, 8, 2, 16)
    assert choose_cutoff(CutoffConfig(mode="off"), 4, p, 1) == -1
    assert choose_cutoff(CutoffConfig(mode="all"), 4, p, 1) == 3
    assert choose_cutoff(CutoffConfig(mode="fixed", layer=2), 4, p, 1) == 2
    assert choose_cutoff(CutoffConfig(mode="auto"), 4, p, 1) == 0
    with pytest.raises(ValueError, match="valid"):
        choose_cutoff(CutoffConfig(mode="sometimes"), 4, p, 1)
    with pytest.raises(ValueError, match="cutoff.layer"):
        choose_cutoff(CutoffConfig(mode="fixed", layer=9), 4, p, 1)
