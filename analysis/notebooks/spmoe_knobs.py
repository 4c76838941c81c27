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
# # SP-MoE's knobs: cutoff layer (auto marked), draft length, component ablations
#
# Loads every finished run under `RESULTS` and writes the cutoff curve, TPOT and bytes vs draft
# length, and the ablation bars into `FIGURES`. Runs: `python run.py -m experiment=cutoff`,
# `experiment=draft_length`, `experiment=ablations` (or their `experiment=cpu/...` variants).

# %% tags=["parameters"]
import os

RESULTS = os.environ.get("SPMOE_RESULTS", "outputs")
FIGURES = os.environ.get("SPMOE_FIGURES", "figures")

# %%
from pathlib import Path

from IPython.display import Image, display

from analysis import figures
from analysis.runs import run_table

runs = run_table([Path(p) for p in RESULTS.split(",")])
cols = ["variant", "method", "card", "cutoff_mode", "cutoff_layer", "num_draft_tokens", "tpot_ms_median",
        "tpot_spread", "h2d_bytes_per_token", "prefetch_coverage"]
runs[[c for c in cols if c in runs]]

# %%
written = {name: figures.FIGURES[name](runs, Path(FIGURES)) for name in ("cutoff", "draft_length", "ablations")}
for name, paths in written.items():
    print(name, [str(p) for p in paths] or "no data in these runs")
    if paths:
        display(Image(str(paths[0])))
