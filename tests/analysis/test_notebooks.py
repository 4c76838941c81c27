"""Every notebook in analysis/notebooks (jupytext percent .py) executed headless with nbclient on a tiny CPU sweep
(tests/analysis/tiny_sweep.py): no cell fails and each writes the figures of its family.

The sweep (~20 s) also checks the figure functions and the report on real run dirs: every figure has data in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis import figures, report
from analysis.runs import run_table
from tiny_sweep import make_tiny_sweep

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = {"methods": ("fig10", "fig11", "table1"), "spmoe_knobs": ("cutoff", "draft_length", "ablations"),
             "per_token": ("breakdown", "step_latency", "predictor")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_tiny_sweep(tmp_path_factory.mktemp("tiny_sweep"))


def test_every_notebook_is_listed():
    assert {p.stem for p in (REPO / "analysis" / "notebooks").glob("*.py")} == set(NOTEBOOKS)
    assert {f for fs in NOTEBOOKS.values() for f in fs} == set(figures.FIGURES)


def test_the_tiny_sweep_feeds_every_figure_and_table(sweep, tmp_path):
    runs = run_table([sweep])
    assert len(runs) == 9 and (runs["rounds"] == 2).all() and runs["config.method.num_slots"].notna().all()
    assert set(runs["variant"]) >= {"spmoe [num_slots=12]", "spmoe [num_slots=24]", "L0", "lru_nosd"}
    written = figures.draw([sweep], tmp_path)
    assert {name for name, paths in written.items() if not paths} == set()
    speedup = report.speedup_table(runs, "lru_nosd")
    assert (speedup.loc[speedup["variant"] == "lru_nosd", "speedup_vs_lru_nosd"] == 1.0).all()


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes_and_writes_its_figures(name, sweep, tmp_path):
    pytest.importorskip("jupytext")
    pytest.importorskip("nbclient")
    from analysis.run_notebook import main, run_notebook

    path = REPO / "analysis" / "notebooks" / f"{name}.py"
    nb = run_notebook(path, sweep, tmp_path / "figures")
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)  # papermill can inject parameters
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    for fig in NOTEBOOKS[name]:
        assert (tmp_path / "figures" / f"{fig}.png").is_file() and (tmp_path / "figures" / f"{fig}.pdf").is_file()
    shown = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) == len(NOTEBOOKS[name])
    if name == "methods":  # the command line keeps the executed notebook
        main([str(path), "--results", str(sweep), "--figures", str(tmp_path / "cli"), "--out", str(tmp_path / "m.ipynb")])
        assert (tmp_path / "m.ipynb").stat().st_size > 10_000 and (tmp_path / "cli" / "fig10.png").is_file()
