"""The tie-aware lossless check (spmoe.trace.lossless): the comparison rule on hand-made logits, and
the whole check through run_benchmark: exact on CPU float32, a corrupted token caught, replay and
sampled runs reported as null with their reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.config import MethodConfig, RoutingConfig, SpecConfig, TraceConfig
from spmoe.engine import Generation
from spmoe.experiment import run_benchmark
from spmoe.session import open_session
from spmoe.trace.lossless import (LosslessCheck, check_lossless, compare, mirror_steps, relative_eps_for,
                                  summary_block, verified_positions)
from spmoe.trace.records import StepRecord


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows)  # [N, V]


def test_compare_splits_agreement_ties_and_losses():
    logits = _logits([[3.0, 1.0, 0.0],    # argmax 0; run 0: agrees
                      [1.0, 1.05, 0.0],   # argmax 1; run 0 is 0.05 below: a tie at tolerance 0.1
                      [0.0, 2.0, 1.0]])   # argmax 1; run 2 is 1.0 below: a loss
    check = LosslessCheck(None, "", 0.1)
    compare([0, 0, 2], logits, [0, 1, 2], [0, 1, 2], 0.1, 7, check)
    assert (check.checked_tokens, check.agreeing_tokens) == (3, 1)
    assert [(t.prompt_idx, t.position, t.step, t.run_token, t.reference_token) for t in check.ties] == [(7, 1, 1, 0, 1)]
    assert check.ties[0].gap == pytest.approx(0.05)
    assert [(t.position, t.gap) for t in check.losses] == [(2, 1.0)]


def test_tolerance_zero_is_exact():
    check = LosslessCheck(None, "", 0.0)
    compare([0], _logits([[1.0, 1.0 + 1e-6]]), [0], [0], 0.0, 0, check)
    assert not check.ties and len(check.losses) == 1
    exact_tie = LosslessCheck(None, "", 0.0)
    compare([1], _logits([[1.0, 1.0]]), [0], [0], 0.0, 0, exact_tie)  # argmax picks 0; equal logits: a tie
    assert len(exact_tie.ties) == 1 and not exact_tie.losses


def test_half_tolerance_grows_with_the_top_logit():
    eps = relative_eps_for(torch.bfloat16)  # 2 ulp per unit of |top logit|
    check = LosslessCheck(None, "", 0.0625)
    compare([1, 1], _logits([[24.0, 23.75], [4.0, 3.75]]), [0, 1], [0, 1], 0.0625, 0, check, eps)
    assert [t.position for t in check.ties] == [0] and [t.position for t in check.losses] == [1]
    assert relative_eps_for(torch.float32) == 0.0


def test_verified_positions_are_each_steps_last_token():
    recs = [StepRecord(0, i, "decode", 0, n, 0.0, 0.0) for i, n in enumerate([1, 3, 1, 2])]
    assert verified_positions(Generation(list(range(7)), recs)) == [0, 3, 4, 6]


def test_mirror_steps_repeat_each_verify_input():
    recs = [StepRecord(0, 0, "prefill", 0, 1, 0.0, 0.0),
            StepRecord(0, 1, "decode", 0, 2, 0.0, 0.0, num_drafted=3, num_accepted=1, draft_ids=[11, 50, 51]),
            StepRecord(0, 2, "decode", 0, 1, 0.0, 0.0)]
    gen = Generation([10, 11, 12, 13], recs)
    steps = mirror_steps(gen)
    assert [(st.fed_ids, st.used) for st in steps] == [([10, 11, 50, 51], 2), ([12], 1)]
    recs[1].draft_ids = [99, 50, 51]  # the record disagrees with the emitted tokens
    assert mirror_steps(gen) is None


@pytest.fixture(scope="module")
def session():
    cfg = tiny_run_config(num_prompts=2, max_new_tokens=10)
    cfg.draft = load_preset("draft", "tiny")
    s = open_session(cfg)
    yield s
    s.close()


def test_offloaded_sd_run_is_exact_and_a_changed_token_is_caught(session):
    gens, _, _ = session.generate(MethodConfig(name="lru", num_slots=3), session.cfg.hardware, 10,
                                  spec_cfg=SpecConfig(num_draft_tokens=2))
    assert all(mirror_steps(g) is not None for g in gens)  # the reference repeats the run's verify steps
    check = check_lossless(session, gens)
    assert check.lossless is True and check.tolerance == 0.0 and check.checked_tokens == 20
    assert check.token_agreement == 1.0 and not check.ties
    bad = [dataclasses.replace(g) for g in gens]
    bad[1].token_ids = list(bad[1].token_ids)
    bad[1].token_ids[4] = (bad[1].token_ids[4] + 1) % 512
    broken = check_lossless(session, bad)
    assert broken.lossless is False and "prompt 1 position 4" in broken.reason
    assert broken.summary()["lossless"] is False
    loose = check_lossless(session, bad, tolerance=1e9)  # everything within tolerance: reported as ties
    assert loose.lossless is True and loose.summary()["tie_divergences"] >= 1
    assert loose.ties[0].position == 4 and loose.ties[0].prompt_idx == 1


def test_sampled_and_unchecked_runs_are_null_with_a_reason(session):
    check = check_lossless(session, [], temperature=0.7)
    assert check.lossless is None and "sampled" in check.reason
    block = summary_block(None, [], 0.0)
    assert block["lossless"] is None and "no reference" in block["lossless_reason"]


def test_run_benchmark_reports_the_check(tmp_path):
    cfg = tiny_run_config(method="lru_nosd", num_prompts=1, max_new_tokens=6, check_lossless="true")
    cfg.draft = load_preset("draft", "tiny")
    cfg.method.num_slots = 2
    s = run_benchmark(cfg, tmp_path)
    assert s["lossless"] is True and s["tie_divergences"] == 0 and s["lossless_tolerance"] == 0.0
    assert s["token_agreement"] == 1.0 and s["lossless_checked_tokens"] == 6 and "exact" in s["lossless_reason"]


def test_replayed_sd_run_is_null_and_its_verified_tokens_are_checked(tmp_path):
    cfg = tiny_run_config(num_prompts=2, max_new_tokens=10, method="lru")
    cfg.draft = load_preset("draft", "tiny")
    cfg.model.weights = "twin"  # a twin accepts most drafts, so steps emit several tokens
    cfg.spec = SpecConfig(num_draft_tokens=2)
    cfg.trace = TraceConfig(routing=True)
    first = run_benchmark(cfg, tmp_path / "rec")
    assert first["lossless"] is True and first["acceptance_rate"] >= 0.5
    cfg.trace = TraceConfig()
    cfg.routing = RoutingConfig(name="replay", trace_path=str(tmp_path / "rec"))
    cfg.model.twin = dataclasses.replace(cfg.model.twin, expert_noise=2.0)  # acceptance not this model's
    s = run_benchmark(cfg, tmp_path / "replay")
    assert s["routing"] == "replay" and s["lossless"] is None and "routing replay" in s["lossless_reason"]
    assert s["replay_verified_argmax"] is True
    assert 0 < s["lossless_checked_tokens"] < 20  # only each step's verified token


def test_exact_check_reports_each_prompts_first_divergence():
    """A length mismatch of a later prompt is reported even when an earlier prompt already diverged."""
    from types import SimpleNamespace

    from spmoe.trace.lossless import exact_check

    def gen(tokens):
        return SimpleNamespace(token_ids=tokens, records=[SimpleNamespace(num_emitted=1) for _ in tokens])

    check = exact_check([gen([1, 2, 3]), gen([4, 5])], [[1, 9, 3], [4, 5, 6]])
    assert check.lossless is False
    assert [(s.prompt_idx, s.position) for s in check.losses] == [(0, 1), (1, 2)]
