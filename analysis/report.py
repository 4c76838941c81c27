"""
Speedup tables from finished runs.

    python -m analysis.report outputs/sweeps/<sweep> [more dirs] [--baseline lru] [--method spmoe] [--out DIR]

Terms (TPOT of a run: `analysis.runs`, the median over its rounds):
- *group* = one (experiment, model, dataset, card, routing source): only runs in the same group are
  compared (`analysis.runs`).
  Several runs of one variant in a group (seeds, repeats) count as their median TPOT.
- *speedup of X over Y* = TPOT(Y) / TPOT(X): above 1 means X is faster.
- `speedup_table`: every variant against `--baseline` (a method or case name) in its group.
- `paper_view`: the paper's framing, SP-MoE's (`--method`) speedup over each other variant, one row
  per group, one column per baseline. SP-MoE is the variant named `--method`, or in a group without
  one, that method's only variant there. A group without the method or any baseline gives no row;
  a baseline missing from a group is NaN there.

- `breakdown_table`: where each run's time goes, from its trace (`analysis.trace.tpot_breakdown`: the
  trace's TPOT as draft + verify compute + stall + other, ms per decode token), beside what explains it:
  bytes per token, expert slots, the host's share of expert calls and the draft's precision, where the
  run records them. A run without a trace gives no row.

Writes into `--out` (default: print only): `runs.csv` (the whole tidy table), `runs.md` (its key
columns), `speedup.{md,csv,tex}`, `paper.{md,csv,tex}`, `breakdown.{md,csv,tex}`. Markdown and LaTeX show
3 significant digits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.runs import GROUP_KEYS, KEY_COLUMNS, run_table
from analysis.trace import BREAKDOWN, per_run, tpot_breakdown
from spmoe.io import write_text_atomic

TPOT = "tpot_ms_median"
EXPLAINS = ("h2d_bytes_per_token", "num_slots", "host_expert_fraction", "num_draft_tokens", "mean_acceptance_length",
            "draft_precision")  # summary columns shown beside the breakdown, where runs record them


def variant_tpot(df: pd.DataFrame, group_keys=GROUP_KEYS) -> pd.DataFrame:
    """One row per (group, variant): median TPOT over its runs, its method and weights, the runs counted,
    the largest round spread."""
    keys = [k for k in group_keys if k in df]
    rows = df.dropna(subset=[TPOT]).copy()
    for key in keys:
        rows[key] = rows[key].fillna("-").astype(str)
    extra = {"weights": ("weights", "first")} if "weights" in rows else {}
    out = rows.groupby(keys + ["variant"], sort=False).agg(
        method=("method", "first"), tpot_ms=(TPOT, "median"), tpot_spread=("tpot_spread", "max"),
        num_runs=(TPOT, "size"), **extra)
    return out.reset_index()


def speedup_table(df: pd.DataFrame, baseline: str, group_keys=GROUP_KEYS) -> pd.DataFrame:
    """Every variant's speedup over `baseline` (a variant or method name) in its group."""
    tpot = variant_tpot(df, group_keys)
    keys = [k for k in group_keys if k in tpot]
    base = tpot[(tpot["variant"] == baseline) | (tpot["method"] == baseline)]
    base = base.groupby(keys)["tpot_ms"].median().rename("baseline_tpot_ms").reset_index()
    out = tpot.merge(base, on=keys, how="inner")
    out[f"speedup_vs_{baseline}"] = out["baseline_tpot_ms"] / out["tpot_ms"]
    return out.sort_values(keys + ["tpot_ms"], kind="stable").reset_index(drop=True)


def paper_view(df: pd.DataFrame, method: str = "spmoe", group_keys=GROUP_KEYS) -> pd.DataFrame:
    """`method`'s speedup over each other variant, one row per group (NaN where a group lacks one)."""
    tpot = variant_tpot(df, group_keys)
    keys = [k for k in group_keys if k in tpot]
    mine = reference_rows(tpot, method, keys)
    ours = mine.set_index(keys)["tpot_ms"]
    others = tpot.drop(mine.index)
    if ours.empty or others.empty:
        return pd.DataFrame(columns=keys + [f"{method}_tpot_ms"])
    wide = others.pivot_table(index=keys, columns="variant", values="tpot_ms", aggfunc="median", sort=False)
    wide = wide.reindex(ours.index).div(ours, axis=0)
    wide.columns = [f"vs {c}" for c in wide.columns]
    wide = wide.dropna(how="all").dropna(axis=1, how="all")  # no row without a baseline, no empty column
    wide.insert(0, f"{method}_tpot_ms", ours.reindex(wide.index).to_numpy())
    return wide.reset_index()


def breakdown_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with a trace: variant, card, the trace's TPOT and its parts (ms per decode token),
    then the EXPLAINS columns the runs have."""
    parts = per_run(runs, tpot_breakdown)
    if parts.empty:
        return pd.DataFrame(columns=["variant", "card", "tpot_ms", *BREAKDOWN])
    explains = [c for c in EXPLAINS if c in runs and runs[c].notna().any()]
    merged = parts.merge(runs[["run_dir", *explains]], on="run_dir", how="left")
    return merged[["variant", "card", "tpot_ms", *BREAKDOWN, *explains]].sort_values(["card", "tpot_ms"],
                                                                                      ignore_index=True)


def reference_rows(tpot: pd.DataFrame, name: str, keys: list[str]) -> pd.DataFrame:
    """Per group, the variant named `name`; where there is none, the only variant of method `name`."""
    exact = tpot[tpot["variant"] == name]
    if not keys:  # one group
        by_method = tpot[tpot["method"] == name]
        return exact.iloc[:1] if len(exact) else by_method if len(by_method) == 1 else exact
    by_method = tpot[tpot["method"] == name].groupby(keys, sort=False).filter(lambda g: len(g) == 1)
    taken = set(map(tuple, exact[keys].to_numpy()))
    by_method = by_method[[tuple(k) not in taken for k in by_method[keys].to_numpy()]]
    return pd.concat([exact, by_method]).drop_duplicates(subset=keys)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    return df.map(_cell).to_markdown(index=False) + "\n"


def to_latex(df: pd.DataFrame, caption: str = "") -> str:
    """A booktabs tabular (no jinja2 needed): strings escaped, floats at 3 significant digits."""
    def esc(text: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
            text = text.replace(a, b)
        return text

    align = "".join("r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in df.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(esc(str(c)) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(_cell(v)) for v in row) + r" \\" for row in df.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{esc(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_tables(name: str, df: pd.DataFrame, out: Path, caption: str = "") -> None:
    write_text_atomic(out / f"{name}.csv", df.to_csv(index=False))
    write_text_atomic(out / f"{name}.md", to_markdown(df))
    write_text_atomic(out / f"{name}.tex", to_latex(df, caption))


def write_report(paths, out: Path | None, baseline: str, method: str) -> dict[str, pd.DataFrame]:
    """The tables for the runs under `paths`; written into `out` when given."""
    runs = run_table(paths)
    if runs.empty:
        raise SystemExit(f"no finished runs (summary.json) under {[str(p) for p in paths]}")
    tables = {"runs": runs, "speedup": speedup_table(runs, baseline), "paper": paper_view(runs, method),
              "breakdown": breakdown_table(runs)}
    if out is not None:
        write_text_atomic(out / "runs.csv", runs.to_csv(index=False))
        write_text_atomic(out / "runs.md", to_markdown(runs[list(KEY_COLUMNS)]))
        write_tables("speedup", tables["speedup"], out, f"TPOT speedup over {baseline} (TPOT({baseline}) / TPOT)")
        write_tables("paper", tables["paper"], out, f"{method}'s TPOT speedup over each baseline")
        write_tables("breakdown", tables["breakdown"], out, "Where each run's time goes, ms per decode token")
    return tables


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="run dirs, sweep dirs or folders above them")
    ap.add_argument("--baseline", default="lru", help="variant or method every TPOT is compared to (default lru)")
    ap.add_argument("--method", default="spmoe", help="the method of the paper's view (default spmoe)")
    ap.add_argument("--out", type=Path, default=None, help="write runs/speedup/paper tables here")
    args = ap.parse_args(argv)
    tables = write_report(args.paths, args.out, args.baseline, args.method)
    print(f"{len(tables['runs'])} runs\n")
    for name in ("speedup", "paper", "breakdown"):
        table = tables[name]
        print(f"## {name}\n\n" + (to_markdown(table) if len(table) else "(no comparable runs)\n"))
    if args.out is not None:
        print(f"tables -> {args.out}")


if __name__ == "__main__":
    main()
