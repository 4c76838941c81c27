"""experiments.report_offload on two hand-made result dirs: exact cutoff, ablation and method numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from experiments.report_offload import load_result_dirs, write_report

COLUMNS = ["case", "sd", "tpot_ms", "hit_rate", "coverage", "waste", "h2d_gb_per_token", "runtime_eff",
           "policy_eff", "error"]
BUDGET_24 = [  # case, sd, tpot_ms
    ("gpu_resident", False, 50.0), ("gpu_resident_sd", True, 40.0), ("lru_nosd", False, 400.0),
    ("lru", True, 320.0), ("spmoe", True, 210.0), ("spmoe_off", True, 300.0), ("spmoe_L1", True, 250.0),
    ("spmoe_L3", True, 200.0), ("spmoe_L5", True, 220.0), ("spmoe_all", True, 260.0),
    ("spmoe_lru", True, 231.0), ("spmoe_nobatch", True, 252.0), ("moe_infinity", True, 240.0),
    ("moe_infinity_nosd", False, 500.0),
]


def write_dir(path: Path, rows: list[tuple], runs: dict, meta: dict | None = None, failed: str | None = None) -> Path:
    path.mkdir()
    frame = pd.DataFrame([{"case": c, "sd": sd, "tpot_ms": t, "hit_rate": 0.5, "coverage": 0.25, "waste": 0.125,
                           "h2d_gb_per_token": 2.0, "runtime_eff": 0.5, "policy_eff": 1.5} for c, sd, t in rows])
    if failed:
        frame = pd.concat([frame, pd.DataFrame([{"case": failed, "error": "ValueError('too few slots')"}])])
    frame.reindex(columns=COLUMNS).to_csv(path / "main.csv", index=False)
    (path / "runs.json").write_text(json.dumps(runs))
    if meta is not None:
        (path / "table.md").write_text("".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n| case |\n")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    a = write_dir(tmp_path / "a", BUDGET_24, failed="mixtral_offloading",
                  meta={"model": "mixtral", "budget": "rtx4090"},
                  runs={"spmoe": {"cutoff_layer": 3, "gpu_budget_bytes": 24 * 2**30},
                        "spmoe_all": {"predictor_top1_by_layer": {str(i): 1.0 for i in range(8)}}})
    # the 40 GiB dir: no meta (labelled by its name), auto's cutoff unknown, spmoe_all only in runs.json
    b = write_dir(tmp_path / "a100_40g", [("lru", True, 300.0), ("spmoe", True, 189.0), ("spmoe_L2", True, 180.0),
                                          ("spmoe_noworker", True, 198.0)],
                  runs={"spmoe": {}, "spmoe_all": {"tpot_ms": 190.0, "num_moe_layers": 8}})
    out = tmp_path / "out"
    return write_report(load_result_dirs([a, b]), out), out


def test_cutoff_best_fixed_and_auto_ratio(report):
    tables, out = report
    summary = tables["cutoff_summary"].set_index("budget")
    s24, s40 = summary.loc["rtx4090"], summary.loc["a100_40g"]
    assert (s24["best_case"], s24["best_cutoff_layer"], s24["best_tpot_ms"]) == ("spmoe_L3", 3, 200.0)
    assert (s24["auto_cutoff_layer"], s24["auto_tpot_ms"], s24["auto_over_best"]) == (3, 210.0, 1.05)
    assert s24["auto_within_target"] and s24["lru_tpot_ms"] == 320.0
    assert (s40["best_case"], s40["best_cutoff_layer"], s40["auto_over_best"]) == ("spmoe_L2", 2, 1.05)
    assert math.isnan(s40["auto_cutoff_layer"])
    curve = tables["cutoff"].set_index(["budget", "case"])["cutoff_layer"]
    assert curve[("rtx4090", "spmoe_off")] == -1 and curve[("rtx4090", "spmoe_all")] == 7  # depth 8 -> L* = 7
    assert curve[("a100_40g", "spmoe_all")] == 7
    assert (out / "cutoff.png").stat().st_size > 1000 and (out / "methods.png").stat().st_size > 1000
    assert pd.read_csv(out / "cutoff.csv").shape[0] == len(tables["cutoff"]) == 11
    assert "spmoe_L3" in (out / "cutoff.md").read_text()


def test_ablation_deltas(report):
    tables, out = report
    abl = tables["ablations"].set_index(["budget", "case"])
    assert list(abl.index) == [("rtx4090", "spmoe_lru"), ("rtx4090", "spmoe_nobatch"), ("a100_40g", "spmoe_noworker")]
    assert (abl.loc[("rtx4090", "spmoe_lru"), ["ratio_to_spmoe", "delta_ms"]] == [1.1, 21.0]).all()
    assert (abl.loc[("rtx4090", "spmoe_nobatch"), ["ratio_to_spmoe", "delta_ms"]] == [1.2, 42.0]).all()
    assert (abl.loc[("a100_40g", "spmoe_noworker"), ["ratio_to_spmoe", "delta_ms"]] == [198.0 / 189.0, 9.0]).all()
    assert "spmoe_attn_out" in (out / "ablations.md").read_text()  # listed as not run
    assert pd.read_csv(out / "ablations.csv").shape[0] == 3


def test_methods_ratio_to_lru(report):
    tables, out = report
    m = tables["methods"].set_index(["budget", "case"])
    assert m.loc[("rtx4090", "spmoe"), "ratio_to_lru"] == 210.0 / 320.0
    assert m.loc[("rtx4090", "moe_infinity"), "ratio_to_lru"] == 0.75
    assert m.loc[("rtx4090", "moe_infinity_nosd"), "ratio_to_lru"] == 1.25  # against lru_nosd
    assert m.loc[("rtx4090", "gpu_resident"), "ratio_to_lru"] == 0.125
    assert m.loc[("rtx4090", "moe_infinity_nosd"), "method"] == "moe_infinity"
    assert not m.loc[("rtx4090", "moe_infinity_nosd"), "sd"] and m.loc[("rtx4090", "gpu_resident_sd"), "sd"]
    failed = m.loc[("rtx4090", "mixtral_offloading")]
    assert failed["sd"] and math.isnan(failed["ratio_to_lru"]) and "too few" in failed["error"]
    assert m.loc[("rtx4090", "lru"), "budget_gib"] == 24.0
    assert m.loc[("a100_40g", "spmoe"), "ratio_to_lru"] == 0.63
    assert [c for b, c in m.index if b == "rtx4090"][:4] == ["gpu_resident", "gpu_resident_sd", "lru_nosd", "lru"]
    assert not any(c.startswith("spmoe_") for _, c in m.index)
    assert (out / "methods.md").is_file() and pd.read_csv(out / "methods.csv").shape[0] == len(m)
