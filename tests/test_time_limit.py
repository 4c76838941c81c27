"""experiment.time_limit_s: stages that would end past the allowance are skipped, and the summaries say so."""

import json

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


def test_a_limit_must_be_positive():
    with pytest.raises(ValueError, match="time_limit_s must be > 0"):
        TimeLimit(0)


def test_an_experiment_past_its_limit_keeps_the_rounds_it_ran_and_says_what_it_skipped(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        overrides = ["experiment=cpu/harness_check", "experiment.only=[lru_nosd,lru]", "max_new_tokens=4"]
        cases = entry._cases(compose(config_name="config", overrides=overrides), overrides, tmp_path)
    from spmoe.experiment import run_cases

    limit = TimeLimit(1e-3)  # already past when the first round ends
    summaries = run_cases(cases, rounds=3, warmup_tokens=0, experiment="x", time_limit=limit)
    for i, s in enumerate(summaries):
        on_disk = json.loads((tmp_path / s["case"] / "summary.json").read_text())
        assert on_disk["rounds"] == 1 and on_disk["rounds_planned"] == 3 and len(on_disk["tpot_ms_rounds"]) == 1
        if i == 0:  # the first check always runs
            assert on_disk["lossless"] is True
        else:
            assert on_disk["lossless"] is None and "time_limit_s" in on_disk["lossless_reason"]
