"""
Finished runs as one tidy table: one row per run directory, read from its `summary.json`.

Terms:
- A *run dir* holds `summary.json` (written last and atomically, so its presence marks a finished
  run), `trace.jsonl` and `generations.jsonl`. A path given here may be a run dir, a sweep dir or any
  folder above them: every `**/summary.json` below it is one run. Nothing else is read.
- *card* = the hardware profile's name, with ` (emulated)` when the summary says the card was
  emulated on a larger GPU (a memory budget and/or a paced PCIe link), e.g. `rtx4090 (emulated)`.
- *variant* = the case name when the run is a case of an experiment, else the method name.
- *TPOT* of a run = `tpot_ms_median` (median over interleaved rounds); runs written before rounds
  existed have only `tpot_ms`, which then stands for the median, with `rounds` = 1 and spread 0.
  `tpot_spread` = (max - min) / median over rounds.

Columns: every scalar summary key as written (lists and dicts such as `tpot_ms_rounds` or
`predictor_top1_by_layer` are left out: the trace functions and the figures read those), the
resolved run config flattened under `config.` (`config.method.cutoff.mode`), and `run_dir`, `card`,
`variant`, `gpu_budget_gib`. Missing keys are NaN, never an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

GIB = 2**30
KEY_COLUMNS = ("variant", "method", "model", "draft", "dataset", "card", "routing", "weights", "num_draft_tokens",
               "tpot_ms_median", "tpot_spread", "rounds", "acceptance_rate", "expert_hit_rate",
               "h2d_bytes_per_token", "lossless")
GROUP_KEYS = ("model", "dataset", "card", "routing")


def find_runs(paths) -> list[Path]:
    """Run dirs (those holding a summary.json) under each path, in path order then sorted, no repeats."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run or sweep directory")
        for summary in sorted(path.rglob("summary.json")):
            if summary.parent.name != "partial":
                found.setdefault(summary.parent.resolve(), None)
    return list(found)


def load_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, out)
    elif not isinstance(value, list):
        out[prefix] = value


def _card(hardware, emulated) -> str | None:
    if hardware is None or (isinstance(hardware, float) and pd.isna(hardware)):
        return None
    return f"{hardware} (emulated)" if emulated is True else str(hardware)


def run_row(run_dir: Path, summary: dict) -> dict:
    """One run's row: scalar summary keys, `config.*`, and the derived columns of the module docstring."""
    row = {key: value for key, value in summary.items() if not isinstance(value, (dict, list))}
    _flatten("config", summary.get("config") or {}, row)
    row["run_dir"] = str(run_dir)
    row["card"] = _card(summary.get("hardware"), summary.get("hardware_emulated"))
    row["variant"] = summary.get("case") or summary.get("method")
    row["routing"] = summary.get("routing") or "model"
    median = summary.get("tpot_ms_median", summary.get("tpot_ms"))
    row["tpot_ms_median"] = median
    rounds = summary.get("tpot_ms_rounds") or []
    row["rounds"] = summary.get("rounds") or max(len(rounds), 1)
    if "tpot_spread" not in summary:
        spread = (max(rounds) - min(rounds)) / median if len(rounds) > 1 and median else 0.0
        row["tpot_spread"] = spread
    budget = summary.get("gpu_budget_bytes")
    row["gpu_budget_gib"] = budget / GIB if budget else None
    return row


def run_table(paths) -> pd.DataFrame:
    """The tidy table of every finished run under `paths` (empty frame with KEY_COLUMNS when none)."""
    rows = [run_row(d, load_summary(d)) for d in find_runs(paths)]
    if not rows:
        return pd.DataFrame(columns=list(KEY_COLUMNS) + ["run_dir"])
    df = pd.DataFrame(rows)
    for col in KEY_COLUMNS:
        if col not in df:
            df[col] = None
    front = [c for c in KEY_COLUMNS] + ["run_dir"]
    return df[front + [c for c in df.columns if c not in front]]


def varying_config(df: pd.DataFrame) -> list[str]:
    """`config.*` columns whose value differs between rows (what a sweep swept), seed and paths excluded."""
    cols = []
    for col in df.columns:
        if not col.startswith("config.") or col.endswith(("seed", "dir", "path")):
            continue
        if df[col].astype(str).nunique(dropna=False) > 1:
            cols.append(col)
    return cols


def describe_source(df: pd.DataFrame) -> str:
    """The label every figure carries: routing source(s), card(s) with emulation, weights."""
    parts = []
    for col, name in (("routing", "routing"), ("card", "card"), ("weights", "weights")):
        if col in df:
            values = sorted({str(v) for v in df[col].dropna()})
            if values:
                parts.append(f"{name}: {', '.join(values)}")
    return "; ".join(parts)
