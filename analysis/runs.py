"""
Finished runs as one tidy table: one row per run directory, read from its `summary.json`.

Terms:
- A *run dir* holds `summary.json` (written last and atomically, so its presence marks a finished
  run), `trace.jsonl` and `generations.jsonl`. A path given here may be a run dir, a sweep dir or any
  folder above them: every `**/summary.json` below it is one run. Nothing else is read.
- *card* = the hardware profile's name, then in brackets its GPU memory budget, its paced PCIe
  bandwidth and `emulated` when the summary says the card was emulated on a larger GPU, e.g.
  `rtx4090 (24 GiB, 25 GB/s, emulated)`; a budget is part of the card, so runs at different
  budgets are never compared as one card.
- *variant* = the case name when the run is a case of an experiment, else the method name, followed
  by the knobs in which runs of that case (method) differ within one comparison group (GROUP_KEYS),
  e.g. `spmoe [cutoff.mode=fixed, cutoff.layer=3]` (knobs: `config.method.*`, `config.spec.*`, the
  draft; the summary's own keys for runs without a `config`). Runs differing only in seed share one.
- *runtime* = how the run decoded (`hardware.decode`: eager, static or graphs; summaries written
  before the field existed ran eager).
- *comparison group* = (experiment, model, dataset, card, routing source, runtime): tables and figures
  compare runs within one group only (runs of one experiment share a process and its interleaved rounds;
  runs outside any experiment form the group `-`).
- *TPOT* of a run = the low median of `tpot_ms_rounds` (the median over interleaved rounds; for an
  even count the lower middle round, the round the summary describes: summaries written before that
  rule stored the mean of the middle two as `tpot_ms_median`); runs without rounds have only
  `tpot_ms`, which then stands for the median, with `rounds` = 1 and spread 0.
  `tpot_spread` = (max - min) / median over rounds, as the summary states it.

Columns: every scalar summary key as written (lists and dicts such as `tpot_ms_rounds` or
`predictor_top1_by_layer` are left out: the trace functions and the figures read those), the
resolved run config flattened under `config.` (`config.method.cutoff.mode`), and `run_dir`, `card`,
`runtime`, `variant`, `gpu_budget_gib`. Missing keys are NaN, never an error.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd

GIB = 2**30
KEY_COLUMNS = ("variant", "method", "model", "draft", "dataset", "card", "routing", "runtime", "weights",
               "num_draft_tokens", "tpot_ms_median", "tpot_spread", "rounds", "acceptance_rate", "expert_hit_rate",
               "h2d_bytes_per_token", "lossless")
GROUP_KEYS = ("experiment", "model", "dataset", "card", "routing", "runtime")
KNOB_PREFIXES = ("config.method.", "config.spec.", "config.draft.name")
SUMMARY_KNOBS = ("draft", "num_draft_tokens", "eviction", "cutoff")


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


def _card(summary: dict) -> str | None:
    hardware = summary.get("hardware")
    if hardware is None:
        return None
    budget, paced = summary.get("gpu_budget_bytes"), summary.get("pcie_paced_gb_per_s")
    notes = [f"{budget / GIB:.3g} GiB" if budget else None, f"{paced:.3g} GB/s" if paced else None,
             "emulated" if summary.get("hardware_emulated") is True else None]
    notes = [n for n in notes if n]
    return f"{hardware} ({', '.join(notes)})" if notes else str(hardware)


def _value(value) -> str:
    return f"{value:.0f}" if isinstance(value, float) and value.is_integer() else str(value)


def run_row(run_dir: Path, summary: dict) -> dict:
    """One run's row: scalar summary keys, `config.*`, and the derived columns of the module docstring."""
    row = {key: value for key, value in summary.items() if not isinstance(value, (dict, list))}
    _flatten("config", summary.get("config") or {}, row)
    row["run_dir"] = str(run_dir)
    row["card"] = _card(summary)
    row["variant"] = summary.get("case") or summary.get("method")
    row["routing"] = summary.get("routing") or "model"
    row["runtime"] = summary.get("decode") or "eager"
    row["experiment"] = summary.get("experiment")
    rounds = [t for t in summary.get("tpot_ms_rounds") or [] if t is not None]
    median = statistics.median_low(rounds) if rounds else summary.get("tpot_ms_median", summary.get("tpot_ms"))
    row["tpot_ms_median"] = median
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
    df["variant"] = _variants(df)
    for col in KEY_COLUMNS:
        if col not in df:
            df[col] = None
    front = [c for c in KEY_COLUMNS] + ["run_dir"]
    return df[front + [c for c in df.columns if c not in front]]


def _knob_name(col: str) -> str:
    for prefix in ("config.method.", "config.spec.", "config.hardware.", "config."):
        if col.startswith(prefix):
            return col[len(prefix):]
    return col


def _variants(df: pd.DataFrame) -> pd.Series:
    """`variant` = case or method, with the knobs appended in which runs of the same case (or method) differ
    within one comparison group (module docstring)."""
    base = df["variant"].copy()
    out = base.copy()
    if "cutoff_mode" in df:
        layer = df.get("cutoff_layer", pd.Series(index=df.index, dtype=object))
        fixed = layer.map(lambda v: f"L{int(v)}" if pd.notna(v) else "L?")
        df = df.assign(cutoff=df["cutoff_mode"].where(df["cutoff_mode"] != "fixed", fixed))
    has_config = df["config.method.name"].notna() if "config.method.name" in df else pd.Series(False, index=df.index)
    keys = [df[k].fillna("-").astype(str) for k in GROUP_KEYS if k in df]
    for (name, with_config, *_), rows in df.groupby([base, has_config, *keys], dropna=False, sort=False):
        if len(rows) < 2:
            continue
        knobs = [c for c in rows.columns if c.startswith(KNOB_PREFIXES) and not c.endswith(("_dir", "path"))]
        knobs = knobs if with_config else [c for c in SUMMARY_KNOBS if c in rows]
        varying = [c for c in knobs if rows[c].astype(str).nunique() > 1]
        for idx, row in rows.iterrows():
            if varying:
                out[idx] = f"{name} [" + ", ".join(f"{_knob_name(c)}={_value(row[c])}" for c in varying) + "]"
    return out


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
