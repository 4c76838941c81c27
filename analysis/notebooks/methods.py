# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Methods: TPOT per method (Fig. 10), TPOT vs GPU memory (Fig. 11), acceptance per pair (Table 1)
#
# Loads every finished run (`**/summary.json`) under `RESULTS` (comma-separated run or sweep dirs),
# prints the tidy table and the speedup tables, and writes the figures into `FIGURES`.
# Runs with `python run.py -m experiment=fig10_tpot` / `fig11_memory` / `acceptance` (GPU) or their
# `experiment=cpu/...` variants (CPU, tiny models). Parameters come from the environment
# (`SPMOE_RESULTS`, `SPMOE_FIGURES`, `SPMOE_BASELINE`) or from papermill (`-p RESULTS ...`).

# %% tags=["parameters"]
import os

RESULTS = os.environ.get("SPMOE_RESULTS", "outputs")
FIGURES = os.environ.get("SPMOE_FIGURES", "figures")
BASELINE = os.environ.get("SPMOE_BASELINE", "lru")

# %%
from pathlib import Path

from IPython.display import Image, display

from analysis import figures, report
from analysis.runs import KEY_COLUMNS, run_table

runs = run_table([Path(p) for p in RESULTS.split(",")])
runs[list(KEY_COLUMNS)]

# %% [markdown]
# ## Speedups: every variant against the baseline, and SP-MoE against each baseline (the paper's view)

# %%
report.speedup_table(runs, BASELINE)

# %%
report.paper_view(runs, "spmoe")

# %% [markdown]
# ## Figures

# %%
written = {name: figures.FIGURES[name](runs, Path(FIGURES)) for name in ("fig10", "fig11", "table1")}
for name, paths in written.items():
    print(name, [str(p) for p in paths] or "no data in these runs")
    if paths:
        display(Image(str(paths[0])))

# %%
figures.acceptance_table(runs)
