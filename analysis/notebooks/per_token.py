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
# # Per token: TPOT breakdown, step latency, per-layer hits and predictor accuracy
#
# Reads each run's `trace.jsonl` (one record per engine step) under `RESULTS`: TPOT split into
# draft / verify compute / stall / other host time, the decode step latency distribution, per-layer
# hit rate, prefetch coverage and predictor accuracy, and bytes moved per emitted token.

# %% tags=["parameters"]
import os

RESULTS = os.environ.get("SPMOE_RESULTS", "outputs")
FIGURES = os.environ.get("SPMOE_FIGURES", "figures")

# %%
from pathlib import Path

from IPython.display import Image, display

from analysis import figures
from analysis.runs import run_table
from analysis.trace import bytes_per_token, layer_table, per_run, step_latency, tpot_breakdown

runs = run_table([Path(p) for p in RESULTS.split(",")])
per_run(runs, tpot_breakdown)

# %%
per_run(runs, step_latency)

# %%
per_run(runs, lambda records: {"h2d_bytes_per_token": bytes_per_token(records)})

# %%
per_run(runs, layer_table)

# %%
written = {name: figures.FIGURES[name](runs, Path(FIGURES)) for name in ("breakdown", "step_latency", "predictor")}
for name, paths in written.items():
    print(name, [str(p) for p in paths] or "no data in these runs")
    if paths:
        display(Image(str(paths[0])))
