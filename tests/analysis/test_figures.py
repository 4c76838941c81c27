"""analysis.figures on hand-made run dirs: each figure is written (PNG + PDF) when its data exists, skipped when not."""

from __future__ import annotations

import pytest

from analysis import figures
from analysis.runs import run_table
from hand_made import nosd_trace, sd_trace, write_run

GIB = 2**30


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for method, tpot in (("spmoe", 780.0), ("lru", 1950.0), ("mixtral_offloading", 1425.0), ("adapmoe", 914.0)):
        write_run(root, f"main/{method}", trace=sd_trace(), method=method, tpot_ms=tpot, acceptance_rate=0.9,
                  mean_acceptance_length=1.9, gpu_budget_bytes=24 * GIB, h2d_bytes_per_token=2e8)
    write_run(root, "main/lru_nosd", trace=nosd_trace(), method="lru_nosd", tpot_ms=2500.0, num_draft_tokens=None,
              draft=None, gpu_budget_bytes=24 * GIB)
    for gib, tpot in ((16, 900.0), (40, 700.0)):
        write_run(root, f"mem/spmoe_{gib}", method="spmoe", tpot_ms=tpot, gpu_budget_bytes=gib * GIB, case="spmoe")
        write_run(root, f"mem/lru_{gib}", method="lru", tpot_ms=2 * tpot, gpu_budget_bytes=gib * GIB, case="lru")
    for case, mode, layer, tpot in (("spmoe_off", "off", -1, 1500.0), ("spmoe_L1", "fixed", 1, 1000.0),
                                    ("spmoe_L3", "fixed", 3, 800.0), ("spmoe_auto", "auto", 3, 790.0)):
        write_run(root, f"cut/{case}", method="spmoe", case=case, tpot_ms=tpot, cutoff_mode=mode, cutoff_layer=layer,
                  model="olmoe", gpu_budget_bytes=24 * GIB)
    for k, tpot in ((1, 800.0), (2, 760.0), (4, 900.0)):
        write_run(root, f"k/spmoe_k{k}", method="spmoe", tpot_ms=tpot, num_draft_tokens=k, dataset="gsm8k",
                  h2d_bytes_per_token=1e8 * k, acceptance_rate=0.95 - 0.05 * k)
    return root


def test_every_figure_is_written_as_png_and_pdf(runs_dir, tmp_path):
    written = figures.draw([runs_dir], tmp_path)
    assert set(written) == set(figures.FIGURES)
    for name, paths in written.items():
        assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf"], name
        assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"
        assert paths[0].stat().st_size > 5000
    table = (tmp_path / "table1.md").read_text()
    assert "mistral_7b" in table and "gsm8k" in table
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_acceptance_table_is_per_pair_dataset_and_k(runs_dir):
    table = figures.acceptance_table(run_table([runs_dir])).set_index(["dataset", "num_draft_tokens"])
    assert table.loc[("gsm8k", 2), "acceptance_rate"] == pytest.approx(0.85)
    assert table.loc[("humaneval", 1), "num_runs"] == 4  # main's SD runs; the others report no acceptance
    assert table.loc[("humaneval", 1), "mean_acceptance_length"] == 1.9


def test_figures_without_their_data_are_skipped(tmp_path, capsys):
    write_run(tmp_path / "runs", "only", method="lru_nosd", tpot_ms=10.0, num_draft_tokens=None)
    figures.main([str(tmp_path / "runs"), "--out", str(tmp_path / "figs"), "--only", "fig10,cutoff,breakdown"])
    out = capsys.readouterr().out
    assert "fig10: no data in these runs, skipped" in out and "cutoff: no data" in out and "breakdown: no data" in out
    assert not (tmp_path / "figs").exists() or not list((tmp_path / "figs").iterdir())


def test_unknown_figure_lists_the_valid_names(runs_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown figure.*'fig99'.*valid: fig10, fig11, cutoff"):
        figures.draw([runs_dir], tmp_path, ["fig10", "fig99"])
