"""
Collect finished runs into one table.

    python -m analysis.collect outputs/ --out results/<experiment>/summary.csv

The tidy table of `analysis.runs.run_table` (one row per `**/summary.json`: every scalar summary key,
the resolved config under `config.*`, run dir, card, variant, round spread) as CSV, with a Markdown
twin next to it holding the key columns. Unfinished or interrupted runs have no summary and are
skipped. For speedup tables use `python -m analysis.report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.report import to_markdown
from analysis.runs import KEY_COLUMNS, run_table
from spmoe.io import write_text_atomic


def collect(roots: list[Path]) -> pd.DataFrame:
    return run_table(roots)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    df = collect(args.roots)
    if df.empty:
        raise SystemExit(f"no finished runs (summary.json) under {[str(r) for r in args.roots]}")
    write_text_atomic(args.out, df.to_csv(index=False))
    write_text_atomic(args.out.with_suffix(".md"), to_markdown(df[list(KEY_COLUMNS)]))
    print(f"{len(df)} runs -> {args.out}")


if __name__ == "__main__":
    main()
