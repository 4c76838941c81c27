"""analysis.runs and analysis.report on hand-made run dirs: the tidy table and exact speedups."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import report
from analysis.runs import describe_source, find_runs, run_table, varying_config
from hand_made import write_run

PAPER = {"spmoe": 780.0, "mixtral_offloading": 1425.0, "adapmoe": 914.0, "moe_infinity": 1113.0, "lru": 1950.0}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for i, (method, tpot) in enumerate(PAPER.items()):
        write_run(root, f"{i}_{method}", method=method, tpot_ms=tpot)
    a100 = dict(hardware="a100_40g", hardware_emulated=False)
    write_run(root, "a100/spmoe_s0", method="spmoe", tpot_ms=400.0, seed=0, **a100)
    write_run(root, "a100/spmoe_s1", method="spmoe", tpot_ms=600.0, seed=1, **a100)
    write_run(root, "a100/lru", method="lru", tpot_ms=1000.0, **a100)
    (root / "unfinished").mkdir()  # no summary.json: skipped
    write_run(root / "a100/lru", "partial", method="lru", tpot_ms=1.0)  # a failed run's partial/: skipped
    return root


def test_run_table_one_row_per_finished_run_with_card_and_variant(sweep):
    df = run_table([sweep])
    assert len(df) == 8 and len(find_runs([sweep, sweep / "a100"])) == 8
    assert set(df["card"]) == {"rtx4090 (emulated)", "a100_40g"}
    assert list(df.columns[:3]) == ["variant", "method", "model"]
    row = df[df["method"] == "adapmoe"].iloc[0]
    assert row["tpot_ms_median"] == 914.0 and row["rounds"] == 1 and row["tpot_spread"] == 0.0
    assert describe_source(df) == "routing: model; card: a100_40g, rtx4090 (emulated); weights: random"


def test_rounds_spread_and_config_columns(tmp_path):
    cfg = {"method": {"name": "spmoe", "cutoff": {"mode": "fixed", "layer": 3}}, "seed": 0}
    write_run(tmp_path, "a", method="spmoe", case="spmoe_L3", tpot_ms=11.5, tpot_ms_rounds=[10.0, 12.0, 11.0],
              tpot_ms_median=11.0, rounds=3, config=cfg)
    cfg2 = {"method": {"name": "spmoe", "cutoff": {"mode": "fixed", "layer": 5}}, "seed": 1}
    write_run(tmp_path, "b", method="spmoe", case="spmoe_L5", tpot_ms=9.0, tpot_ms_rounds=[9.0, 9.0],
              tpot_ms_median=9.0, rounds=2, tpot_spread=0.25, config=cfg2)
    df = run_table([tmp_path]).set_index("variant")
    assert df.loc["spmoe_L3", "tpot_ms_median"] == 11.0
    assert df.loc["spmoe_L3", "tpot_spread"] == pytest.approx(2.0 / 11.0)
    assert df.loc["spmoe_L5", "tpot_spread"] == 0.25  # the summary's own value wins
    assert df.loc["spmoe_L3", "config.method.cutoff.layer"] == 3
    assert "tpot_ms_rounds" not in df  # lists are left out of the tidy table
    write_run(tmp_path, "c", method="lru", case="lru", tpot_ms=118.9, tpot_ms_rounds=[217.8, 118.9],
              tpot_ms_median=168.35, rounds=2, config=cfg)  # an older summary: the mean of the middle two
    assert run_table([tmp_path]).set_index("variant").loc["lru", "tpot_ms_median"] == 118.9  # the low median
    assert varying_config(df.reset_index()) == ["config.method.cutoff.layer"]  # seed excluded


def test_speedup_over_baseline_per_group_with_median_of_repeats(sweep):
    table = report.speedup_table(run_table([sweep]), "lru")
    rtx = table[table["card"] == "rtx4090 (emulated)"].set_index("variant")
    assert rtx["speedup_vs_lru"].to_dict() == pytest.approx({m: 1950.0 / t for m, t in PAPER.items()})
    assert list(rtx.index) == ["spmoe", "adapmoe", "moe_infinity", "mixtral_offloading", "lru"]  # fastest first
    a100 = table[table["card"] == "a100_40g"].set_index("variant")
    assert a100.loc["spmoe", "tpot_ms"] == 500.0 and a100.loc["spmoe", "num_runs"] == 2  # median of 400, 600
    assert a100.loc["spmoe", "speedup_vs_lru"] == 2.0


def test_paper_view_spmoe_over_each_baseline(sweep):
    view = report.paper_view(run_table([sweep]), "spmoe").set_index("card")
    rtx = view.loc["rtx4090 (emulated)"]
    assert rtx["spmoe_tpot_ms"] == 780.0
    assert rtx["vs mixtral_offloading"] == pytest.approx(1425 / 780)
    assert rtx["vs adapmoe"] == pytest.approx(914 / 780)
    assert rtx["vs moe_infinity"] == pytest.approx(1113 / 780)
    a100 = view.loc["a100_40g"]
    assert a100["vs lru"] == 2.0 and pd.isna(a100["vs adapmoe"])


def test_groups_never_mix_routing_sources(tmp_path):
    write_run(tmp_path, "m", method="spmoe", tpot_ms=10.0)
    write_run(tmp_path, "r", method="lru", tpot_ms=30.0, routing="replay")
    assert report.speedup_table(run_table([tmp_path]), "lru")["variant"].tolist() == ["lru"]
    assert report.paper_view(run_table([tmp_path]), "spmoe").empty


def test_groups_never_mix_runtimes(tmp_path):
    """Runs that decoded eagerly (summaries without `decode` included) and under CUDA graphs are never
    compared, in tables or figures (fig11 panels per runtime, titled `decode: graphs`)."""
    from analysis.plotting import groups

    write_run(tmp_path, "e", method="spmoe", tpot_ms=10.0)
    write_run(tmp_path, "g", method="lru", tpot_ms=30.0, decode="graphs")
    table = run_table([tmp_path])
    assert sorted(table["runtime"]) == ["eager", "graphs"]
    assert report.speedup_table(table, "lru")["variant"].tolist() == ["lru"]
    assert report.paper_view(table, "spmoe").empty
    titles = [t for t, _ in groups(table)]
    assert len(titles) == 2 and sum("decode: graphs" in t for t in titles) == 1


def test_cli_writes_markdown_csv_latex(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    report.main([str(sweep), "--baseline", "mixtral_offloading", "--out", str(out)])
    names = {p.name for p in out.iterdir()}
    assert {"runs.csv", "runs.md", "speedup.csv", "speedup.md", "speedup.tex", "paper.csv", "paper.md",
            "paper.tex", "breakdown.csv", "breakdown.md", "breakdown.tex"} <= names
    speedup = pd.read_csv(out / "speedup.csv")
    spmoe = speedup[(speedup["variant"] == "spmoe") & (speedup["card"] == "rtx4090 (emulated)")]
    assert spmoe["speedup_vs_mixtral_offloading"].item() == pytest.approx(1425 / 780)
    tex = (out / "paper.tex").read_text()
    assert r"\toprule" in tex and "vs mixtral\\_offloading" in tex and "1.83" in tex
    assert "| rtx4090 (emulated)" in (out / "paper.md").read_text()
    assert "8 runs" in capsys.readouterr().out


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        report.main([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no such run"):
        run_table([tmp_path / "missing"])


def test_caseless_runs_of_one_method_are_told_apart_by_their_knobs(tmp_path):
    cfg = lambda mode, seed: {"method": {"name": "spmoe", "cutoff": {"mode": mode}}, "spec": {"k": 1}, "seed": seed}
    write_run(tmp_path, "c/a", method="spmoe", tpot_ms=10.0, config=cfg("auto", 0))
    write_run(tmp_path, "c/b", method="spmoe", tpot_ms=12.0, config=cfg("off", 0))
    write_run(tmp_path, "c/c", method="spmoe", tpot_ms=14.0, config=cfg("off", 1))  # a seed: same variant
    write_run(tmp_path, "s/a", method="spmoe", tpot_ms=10.0, cutoff_mode="fixed", cutoff_layer=3, model="olmoe")
    write_run(tmp_path, "s/b", method="spmoe", tpot_ms=10.0, cutoff_mode="auto", cutoff_layer=3, model="olmoe")
    write_run(tmp_path, "s/c", method="lru", tpot_ms=10.0, model="olmoe")
    df = run_table([tmp_path])
    assert df["variant"].tolist() == ["spmoe [cutoff.mode=auto]", "spmoe [cutoff.mode=off]",
                                      "spmoe [cutoff.mode=off]", "spmoe [cutoff=L3]", "spmoe [cutoff=auto]", "lru"]
    table = report.speedup_table(df, "spmoe [cutoff.mode=auto]").set_index("variant")
    assert table.loc["spmoe [cutoff.mode=off]", "tpot_ms"] == 13.0  # the two seeds' median


def test_card_names_budget_pacing_and_emulation(tmp_path):
    write_run(tmp_path, "a", method="lru", tpot_ms=1.0, gpu_budget_bytes=24 * 2**30, pcie_paced_gb_per_s=25.0)
    write_run(tmp_path, "b", method="lru", tpot_ms=1.0, gpu_budget_bytes=40 * 2**30, hardware="h200",
              hardware_emulated=False)
    write_run(tmp_path, "c", method="lru", tpot_ms=1.0, hardware="cpu", hardware_emulated=False)
    assert run_table([tmp_path])["card"].tolist() == ["rtx4090 (24 GiB, 25 GB/s, emulated)", "h200 (40 GiB)", "cpu"]


def test_runs_of_different_experiments_are_not_compared(tmp_path):
    write_run(tmp_path, "a/spmoe", method="spmoe", case="spmoe", tpot_ms=10.0, experiment="cutoff")
    write_run(tmp_path, "b/lru", method="lru", case="lru", tpot_ms=30.0, experiment="ablations")
    write_run(tmp_path, "b/spmoe", method="spmoe", case="spmoe", tpot_ms=20.0, experiment="ablations")
    view = report.paper_view(run_table([tmp_path]), "spmoe")
    assert view[["experiment", "spmoe_tpot_ms", "vs lru"]].values.tolist() == [["ablations", 20.0, 1.5]]


def test_collect_writes_the_tidy_table(sweep, tmp_path):
    from analysis import collect

    collect.main([str(sweep), "--out", str(tmp_path / "summary.csv")])
    table = pd.read_csv(tmp_path / "summary.csv")
    assert len(table) == 8 and {"variant", "card", "tpot_ms_median", "run_dir"} <= set(table.columns)
    assert (tmp_path / "summary.md").read_text().startswith("| variant")


def test_breakdown_splits_each_traced_runs_tpot_and_shows_what_explains_it(tmp_path):
    from hand_made import nosd_trace, sd_trace
    write_run(tmp_path, "spmoe", trace=sd_trace(), method="spmoe", tpot_ms=780.0, num_slots=21,
              h2d_bytes_per_token=2e8)
    write_run(tmp_path, "lru_nosd", trace=nosd_trace(), method="lru_nosd", tpot_ms=2500.0, num_draft_tokens=None,
              draft=None, num_slots=62, h2d_bytes_per_token=3e8)
    write_run(tmp_path, "untraced", method="lru", tpot_ms=1000.0)  # no trace: no row
    table = report.breakdown_table(run_table([tmp_path]))
    assert sorted(table["variant"]) == ["lru_nosd", "spmoe"]
    parts = table[["draft_ms", "verify_ms", "stall_ms", "other_ms"]].sum(axis=1)
    assert parts.to_numpy() == pytest.approx(table["tpot_ms"].to_numpy())
    assert table.set_index("variant").loc["lru_nosd", "draft_ms"] == 0
    assert table.set_index("variant").loc["spmoe", "draft_ms"] > 0
    assert {"num_slots", "h2d_bytes_per_token"} <= set(table.columns)
    assert list(table.set_index("variant")["num_slots"].loc[["spmoe", "lru_nosd"]]) == [21, 62]
