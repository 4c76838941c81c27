"""analysis.trace on hand-made traces (tests/analysis/hand_made.py): exact breakdowns, layers and bytes."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.runs import run_table
from analysis.trace import bytes_per_token, layer_table, per_run, read_trace, step_latency, step_table, tpot_breakdown
from hand_made import nosd_trace, sd_trace, write_run


def test_tpot_breakdown_sd_parts_add_up_to_tpot():
    b = tpot_breakdown(sd_trace())
    # prompt 0: TPOT 20 = draft 4 + verify 10 + stall 4 + other 2; prompt 1: 20 = 20/3 + 10 + 2 + 4/3
    assert b == pytest.approx({"tpot_ms": 20.0, "draft_ms": (4 + 20 / 3) / 2, "verify_ms": 10.0, "stall_ms": 3.0,
                               "other_ms": (2 + 4 / 3) / 2})
    assert sum(b[k] for k in ("draft_ms", "verify_ms", "stall_ms", "other_ms")) == pytest.approx(b["tpot_ms"])


def test_tpot_breakdown_without_sd_is_verify_and_stall():
    assert tpot_breakdown(nosd_trace()) == pytest.approx(
        {"tpot_ms": 25.0, "draft_ms": 0.0, "verify_ms": 20.0, "stall_ms": 5.0, "other_ms": 0.0})


def test_step_table_and_latency_distribution():
    steps = step_table(sd_trace())
    assert steps["step_ms"].tolist() == [45.0, 55.0, 60.0]
    assert steps["emitted_total"].tolist() == [4, 6, 10]  # prefill tokens count towards the x-axis
    assert steps["ms_per_token"].tolist() == [15.0, 27.5, 20.0]
    assert steps[["hits", "misses", "prefetch_hits", "late"]].values.tolist() == [[1, 2, 1, 1], [1, 0, 0, 0],
                                                                                [1, 0, 0, 0]]
    lat = step_latency(sd_trace())
    assert lat["num_steps"] == 3 and lat["step_ms_p50"] == 55.0 and lat["step_ms_max"] == 60.0
    assert lat["step_ms_mean"] == pytest.approx(160 / 3) and lat["ms_per_token_p50"] == 20.0
    assert lat["step_ms_p90"] == pytest.approx(59.0)  # linear interpolation between 55 and 60


def test_layer_table_hit_rate_coverage_and_predictor():
    t = layer_table(sd_trace()).set_index("layer")
    assert t.loc[0, ["needed", "hits", "prefetch_hits", "late", "misses"]].tolist() == [3, 2, 1, 0, 0]
    assert t.loc[0, "hit_rate"] == 1.0 and t.loc[0, "prefetch_coverage"] == pytest.approx(1 / 3)
    assert t.loc[0, "predictor_recall"] == 0.5 and t.loc[0, "predictor_top1"] == 0.5
    assert t.loc[1, ["needed", "hits", "prefetch_hits", "late", "misses"]].tolist() == [4, 1, 0, 1, 2]
    assert t.loc[1, "hit_rate"] == 0.25 and t.loc[1, "prefetch_coverage"] == 0.25
    assert t.loc[1, "predictor_recall"] == 0.5 and t.loc[1, "predictor_top1"] == 0.5


def test_bytes_per_emitted_token_excludes_prefill():
    assert bytes_per_token(sd_trace()) == 600 / 8
    assert bytes_per_token(nosd_trace()) == 50.0


def test_per_run_labels_each_runs_rows(tmp_path):
    write_run(tmp_path, "a", trace=sd_trace(), method="spmoe", tpot_ms=20.0)
    write_run(tmp_path, "b", trace=nosd_trace(), method="lru_nosd", tpot_ms=25.0)
    write_run(tmp_path, "c", method="lru", tpot_ms=30.0)  # no trace: no rows
    runs = run_table([tmp_path])
    assert read_trace(runs["run_dir"][0]) == sd_trace()
    parts = per_run(runs, tpot_breakdown).set_index("variant")
    assert parts.loc["spmoe", "stall_ms"] == 3.0 and parts.loc["lru_nosd", "verify_ms"] == 20.0
    assert "lru" not in parts.index
    layers = per_run(runs, layer_table)
    assert layers.groupby("variant")["layer"].apply(list).to_dict() == {"lru_nosd": [0], "spmoe": [0, 1]}
    assert isinstance(layers, pd.DataFrame) and (layers["card"] == "rtx4090 (emulated)").all()
