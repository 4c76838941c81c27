"""The step model's shared terms (`spmoe.plus.step_model`): one u(T) and one E[emitted] for the draft
choice and the adaptive k, with the exact values the two models computed on their own before sharing
them (bit for bit: the expected floats are the old formulas' results)."""

from __future__ import annotations

from spmoe.plus import draft_choice
from spmoe.plus.draft_choice import DraftOption, ModelShape, predict_tpot_ms
from spmoe.plus.k_chooser import KChooser
from spmoe.plus.step_model import expected_emitted, union_size
from spmoe.policy.cutoff import expected_union

SHAPE = ModelShape(num_moe_layers=26, num_target_host_layers=26, num_experts=64, top_k=6, expert_bytes=11_010_048,
                   non_expert_bytes=2_800_000_000, num_draft_tokens=3, acceptance=0.7, link_gb_per_s=25.0,
                   device_gb_per_s=3000.0, layer_ms=0.05)


def test_one_union_and_one_expected_emitted():
    assert union_size is expected_union and draft_choice.union_size is union_size
    assert [union_size(64, 6, t) for t in (1, 2, 3)] == [6.0, 11.4375, 16.365234375]
    assert [expected_emitted(0.7, k) for k in range(4)] == [1.0, 1.7, 2.19, 2.533]
    assert expected_emitted(0.0, 0) == 1.0  # no draft: the bonus token only


def test_draft_choice_predictions_are_unchanged():
    got = [predict_tpot_ms(SHAPE, o) for o in (DraftOption("none", 200), DraftOption("bf16", 150, 1_000_000_000),
                                               DraftOption("int4", 180, 400_000_000))]
    assert got == [63.25101934933333, 87.34453218055009, 85.64681524411108]


def test_k_chooser_model_is_unchanged():
    c = KChooser(1, 26, 64, 6, miss_ms=0.4, accept_prior=0.7)
    assert [c.expected_emitted(k) for k in range(4)] == [expected_emitted(0.7, k) for k in range(4)]
    assert [c.union_size(t) for t in (1, 2, 3)] == [union_size(64, 6, t) for t in (1, 2, 3)]  # nothing measured yet
    c.union[2] = 10.5  # a measured union at T = 2 scales the independent one elsewhere
    assert [c.union_size(t) for t in (1, 3)] == [5.508196721311475, 15.023821721311476]
    assert [c.model_step_ms(k) for k in range(3)] == [57.28524590163934, 109.2, 156.24774590163935]
    assert c.best_k(4) == 1
