"""
Collect finished runs into one table.

    python -m analysis.collect outputs/ --out results/<experiment>/summary.csv

Walks the given directories for `summary.json` (present only for finished runs: it is written
last and atomically), flattens each into one row (nested dicts become `a.b` columns) and writes a
CSV (and a Markdown twin next to it). Unfinished or interrupted runs have no summary and are
skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from spmoe.io import write_text_atomic


def collect(roots: list[Path]) -> pd.DataFrame:
    rows = []
    for root in roots:
        for path in sorted(root.rglob("summary.json")):
            row = pd.json_normalize(json.loads(path.read_text())).iloc[0].to_dict()
            row["run_dir"] = str(path.parent)
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    df = collect(args.roots)
    if df.empty:
        raise SystemExit(f"no finished runs (summary.json) under {[str(r) for r in args.roots]}")
    write_text_atomic(args.out, df.to_csv(index=False))
    write_text_atomic(args.out.with_suffix(".md"), df.to_markdown(index=False) + "\n")
    print(f"{len(df)} runs -> {args.out}")


if __name__ == "__main__":
    main()
