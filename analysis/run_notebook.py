"""
Execute an analysis notebook (a jupytext percent-format `.py` in analysis/notebooks/) headless.

    python -m analysis.run_notebook analysis/notebooks/methods.py --results outputs/sweeps/fig10 \
        --figures figures [--out methods.ipynb]

The notebook reads its parameters from the environment (`SPMOE_RESULTS`: comma-separated run or sweep
dirs; `SPMOE_FIGURES`: where figures go), which this sets for the kernel; it runs with the repository
root as its working directory. `--out` keeps the executed notebook (outputs and images) as `.ipynb`.
A failing cell raises with the cell's error. Needs the `notebooks` extra (jupytext, nbclient, ipykernel).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_notebook(path, results, figures, out=None, timeout_s: int = 600):
    """The executed notebook (nbformat node); `results` is a dir or a list of dirs."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(Path(path))
    dirs = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    saved = {k: os.environ.get(k) for k in ("SPMOE_RESULTS", "SPMOE_FIGURES", "MPLBACKEND")}
    os.environ.update(SPMOE_RESULTS=",".join(str(Path(d).resolve()) for d in dirs),
                      SPMOE_FIGURES=str(Path(figures).resolve()), MPLBACKEND="Agg")
    try:
        NotebookClient(nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if out is not None:
        nbformat.write(nb, str(out))
    return nb


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--results", nargs="+", type=Path, required=True, help="run or sweep dirs")
    ap.add_argument("--figures", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="write the executed notebook (.ipynb) here")
    args = ap.parse_args(argv)
    run_notebook(args.notebook, args.results, args.figures, args.out)
    print(f"{args.notebook}: executed; figures in {args.figures}" + (f"; notebook {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
