"""Cutoff layer L* of the latency model on hand-computed profiles, with and without predictor recall."""

from __future__ import annotations

import pytest

from spmoe.config import CutoffConfig
from spmoe.policy.cutoff import (
    Profile,
    choose_cutoff,
    cutoff_layer,
    expected_union,
    min_recall,
)
from spmoe.policy.profile import load_profile, save_profile


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


def test_recall_cuts_where_wasted_copies_outweigh_useful_ones():
    # t_d=1, t_v=2, t_e=1, L=4, E=8, A=2, S=16, k=1: n = 1, n t_e = 1, V(0) = k L t_d = 4
    # C = 2, 3, 4, 5 ; V = 4, 6, 8, 10 -> all land (L* = 3 without recall)
    # o_l = min(1, max(0, C(l) - 4)) = 0, 0, 0, 1 -> r_min = 0, 0, 0, 1/(1+1) = 0.5
    def p(recall):
        return Profile(1.0, 2.0, 1.0, 4, 8, 2, 16, recall)
    assert cutoff_layer(p(None), 1) == 3
    assert cutoff_layer(p([1.0] * 4), 1) == 3
    assert cutoff_layer(p([0.9, 0.8, 0.7, 0.4]), 1) == 2  # r_3 = 0.4 < 0.5
    assert cutoff_layer(p([0.9, 0.8, 0.7, 0.5]), 1) == 3  # r_3 = r_min: break-even still issued
    assert cutoff_layer(p([0.9, 0.0, 0.9, 0.9]), 1) == 0  # a layer of pure waste stops the prefix
    assert cutoff_layer(p([0.05, 0.9, 0.9, 0.9]), 1) == 3  # hidden copies (o_l = 0): any useful copy pays


def test_recall_threshold_with_partial_overlap():
    # t_d=1, t_v=4, t_e=2, L=4, E=8, A=2, S=16, k=1: n = 1, n t_e = 2, V(0) = 4, V = 4, 8, 12, 16
    # C(0) = 1+2 = 3 (o=0, r_min=0); C(1) = 3+2 = 5 (o = min(2, 1) = 1, r_min = 1/3);
    # C(2) = 7 (o = 2, r_min = 1/2); C(3) = 9 (o = 2, r_min = 1/2)
    def p(recall):
        return Profile(1.0, 4.0, 2.0, 4, 8, 2, 16, recall)
    assert min_recall(2.0, 5.0, 4.0) == pytest.approx(1 / 3)
    assert min_recall(2.0, 3.0, 4.0) == 0.0
    assert cutoff_layer(p(None), 1) == 3
    assert cutoff_layer(p([0.5, 0.3, 0.9, 0.9]), 1) == 0  # 0.3 < 1/3
    assert cutoff_layer(p([0.5, 0.34, 0.5, 0.49]), 1) == 2  # 0.49 < 1/2


def test_recall_never_extends_the_timing_cutoff():
    # the first hand-computed profile: L* = 0 by timing, whatever the recall
    assert cutoff_layer(Profile(1.0, 2.0, 3.0, 4, 8, 2, 16, [1.0] * 4), 1) == 0
    with pytest.raises(ValueError, match="layer_recall"):
        cutoff_layer(Profile(1.0, 2.0, 3.0, 4, 8, 2, 16, [1.0] * 3), 1)


def test_profile_files(tmp_path):
    old = tmp_path / "v1.json"  # written before layer_recall existed
    old.write_text('{"draft_layer_ms": 1.0, "verify_layer_ms": 2.0, "expert_load_ms": 3.0, "num_layers": 4,'
                   ' "num_experts": 8, "top_k": 2, "num_slots": 16}')
    assert load_profile(old) == Profile(1.0, 2.0, 3.0, 4, 8, 2, 16, None)
    new = Profile(1.0, 2.0, 3.0, 4, 8, 2, 16, [0.5, 0.25, 1.0, 0.0])
    save_profile(tmp_path / "v2.json", new)
    assert load_profile(tmp_path / "v2.json") == new
    assert load_profile(tmp_path / "missing.json") is None


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
