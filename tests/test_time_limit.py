"""experiment.time_limit_s: stages that would end past the allowance are skipped, and the summaries say so."""

import json
from contextlib import contextmanager

import pytest
from hydra import compose, initialize_config_dir

import run as entry
from experiments.presets import CONF_DIR
from spmoe import time_limit
from spmoe.time_limit import TimeLimit


class FakeClock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_a_stage_runs_only_if_the_slowest_of_its_kind_would_still_fit(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time_limit.time, "perf_counter", clock)
    limit = TimeLimit(10.0)
    assert limit.allows("round")  # nothing measured yet: the first always runs
    with limit.timed("round"):
        clock.now_s += 4.0
    assert limit.allows("round")  # 4 elapsed + 4 <= 10
    with limit.timed("round"):
        clock.now_s += 3.0  # the slowest stays 4
    assert not limit.allows("round")  # 7 + 4 > 10
    assert limit.allows("check")  # another kind: not measured yet
    assert TimeLimit(None).allows("round")
    assert limit.slowest_s("round") == 4.0 and limit.slowest_s("check") == 0.0
    clock.now_s -= 5.0  # 2 elapsed: 2 + 4 fits, but not with 5 kept for later stages
    assert limit.allows("round") and not limit.allows("round", reserve_s=5.0)


def test_a_limit_must_be_positive():
    with pytest.raises(ValueError, match="time_limit_s must be > 0"):
        TimeLimit(0)


def _cases(tmp_path, only: str, *more: str) -> list:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        overrides = ["experiment=cpu/harness_check", f"experiment.only=[{only}]", "max_new_tokens=4", *more]
        return entry._cases(compose(config_name="config", overrides=overrides), overrides, tmp_path)


def _spent_by_first(kind: str) -> TimeLimit:
    """A 10 s limit whose whole allowance the first stage of `kind` takes."""
    limit = TimeLimit(10.0)
    real_timed = limit.timed

    def timed(stage: str):
        if stage == kind:
            limit.limit_s = limit.elapsed_s() + 1e-3
        return real_timed(stage)

    limit.timed = timed
    return limit


def test_an_experiment_past_its_limit_keeps_the_rounds_it_ran_and_says_what_it_skipped(tmp_path):
    from spmoe.experiment import run_cases

    cases = _cases(tmp_path, "lru_nosd,lru,spmoe")
    summaries = run_cases(cases, rounds=3, warmup_tokens=0, experiment="x", time_limit=_spent_by_first("case"))
    first, *skipped = summaries
    on_disk = json.loads((tmp_path / first["case"] / "summary.json").read_text())
    assert on_disk["rounds"] == 1 and on_disk["rounds_planned"] == 3 and len(on_disk["tpot_ms_rounds"]) == 1
    assert on_disk["lossless"] is True  # the first check always runs
    for s in skipped:  # no round at all: nothing written, so a rerun runs them
        assert "time_limit_s" in s["skipped"] and not (tmp_path / s["case"]).exists()
    again = run_cases(cases, rounds=1, warmup_tokens=0, experiment="x", time_limit=TimeLimit(None))
    assert again[0]["tpot_ms_rounds"] == on_disk["tpot_ms_rounds"]  # kept, not redone
    assert [s["case"] for s in again[1:]] == [s["case"] for s in skipped]
    assert all(s["rounds"] == 1 and (tmp_path / s["case"] / "summary.json").exists() for s in again[1:])


def test_a_case_cut_short_runs_again_when_there_is_more_time(tmp_path):
    """Its summary (1 of 3 rounds under a 10 s limit) stands under the same limit, is kept on disk while a
    rerun is under way, and is replaced by a run without a limit (the limit is not part of the hash)."""
    from spmoe.experiment import run_cases

    def run(limit_s: float | None, limit: TimeLimit) -> dict:  # fresh cases each time, as in a new process
        more = () if limit_s is None else (f"experiment.time_limit_s={limit_s}",)
        return run_cases(_cases(tmp_path, "lru_nosd", *more), rounds=3, warmup_tokens=0, experiment="x",
                         time_limit=limit)[0]

    first = run(10, _spent_by_first("case"))
    assert first["rounds"] == 1 and first["rounds_planned"] == 3
    same = run(10, TimeLimit(10.0))
    assert same["tpot_ms_rounds"] == first["tpot_ms_rounds"]  # the same allowance: not redone
    starved = run(20, _spent_by_first("round"))
    assert starved["tpot_ms_rounds"] == first["tpot_ms_rounds"]  # more time, but no round fit: the old one stands
    more = run(None, TimeLimit(None))
    assert more["rounds"] == 3
    assert json.loads((tmp_path / "lru_nosd" / "summary.json").read_text())["rounds"] == 3


def test_a_check_past_the_limit_is_skipped_and_said(tmp_path):
    from spmoe.experiment import run_cases

    summaries = run_cases(_cases(tmp_path, "lru_nosd,lru"), rounds=2, warmup_tokens=0, experiment="x",
                          time_limit=_spent_by_first("check"))  # rounds fit; the first check takes it all
    assert [s["rounds"] for s in summaries] == [2, 2]
    assert summaries[0]["lossless"] is True
    assert summaries[1]["lossless"] is None and "time_limit_s" in summaries[1]["lossless_reason"]


def test_a_demanded_check_that_did_not_fit_leaves_its_case_to_a_rerun(tmp_path):
    from spmoe.experiment import run_cases

    cases = _cases(tmp_path, "lru_nosd,lru", "check_lossless=true")
    summaries = run_cases(cases, rounds=1, warmup_tokens=0, experiment="x", time_limit=_spent_by_first("check"))
    assert summaries[0]["lossless"] is True
    assert "check_lossless=true" in summaries[1]["skipped"] and not (tmp_path / summaries[1]["case"]).exists()
    again = run_cases(cases, rounds=1, warmup_tokens=0, experiment="x", time_limit=TimeLimit(None))
    assert again[0] == summaries[0] and again[1]["lossless"] is True


def test_cases_run_only_while_the_checks_they_are_owed_still_fit(tmp_path, monkeypatch):
    """check_lossless=true: a case is started only if, after it, every case run so far (and it) can still
    be checked (half the slowest case run each); a case run whose check could not fit would be discarded."""
    from spmoe.experiment import run_cases

    clock = FakeClock()
    monkeypatch.setattr(time_limit.time, "perf_counter", clock)
    limit = TimeLimit(100.0)
    real_timed = limit.timed

    @contextmanager
    def timed(stage: str):
        with real_timed(stage):
            yield
            clock.now_s += {"case": 30.0, "check": 5.0}.get(stage, 0.0)  # each case run 30 s, each check 5 s

    limit.timed = timed
    cases = _cases(tmp_path, "lru_nosd,lru,spmoe", "check_lossless=true")
    summaries = run_cases(cases, rounds=1, warmup_tokens=0, experiment="x", time_limit=limit)
    # lru: 30 elapsed + 30 + 2 owed checks x 15 = 90 <= 100; spmoe: 60 + 30 + 3 x 15 > 100 (without
    # the reservation it would run to 90, and its check, 5 s past the limit, would discard it)
    assert [s.get("lossless") for s in summaries[:2]] == [True, True]
    assert "before its first round" in summaries[2]["skipped"]
