"""
Where a run's device memory peaked: runs `run.py` with the CUDA caching allocator's history recorded,
replays its alloc/free events and lists the blocks live at the peak, grouped by allocation site.

    python -m experiments.memory_peak [--top 20] [--expand 3] [--out peak.csv] -- <run.py overrides>

Terms: an allocation's *site* is the innermost frame of its Python stack inside this repository
(`spmoe/`, `baselines/`, `experiments/`, `run.py`), or its innermost frame where none is; *live* bytes
are allocated and not yet freed (`free_completed`). The peak is the process's (the build, the profile
and every case), so run one case with `check_lossless=false` (the reference check holds every expert)
to see that case's. `--expand N` breaks each of the N largest sites down by the innermost frame of its
blocks' stacks (inside transformers or torch, where a repository frame only calls the model). Needs CUDA; the
history costs a few microseconds per allocation.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch

REPO_DIRS = ("/spmoe/", "/baselines/", "/experiments/", "/run.py")


def _frame(f: dict) -> str:
    return f"{Path(f['filename']).name}:{f['line']} {f['name']}"


def site(frames: list[dict]) -> str:
    """The innermost repository frame of a stack (innermost first), as `file:line name`."""
    for f in frames:
        if any(d in f["filename"] for d in REPO_DIRS):
            return _frame(f)
    return _frame(frames[0]) if frames else "?"


def innermost(frames: list[dict]) -> str:
    """The innermost frame of a stack, repository or not."""
    return _frame(frames[0]) if frames else "?"


def live_at_peak(events: list[dict]) -> tuple[int, dict[int, dict]]:
    """Replay alloc / free_completed events in order: (peak live bytes, the blocks live then by address)."""
    best = [0, -1]  # peak bytes, the first event index that reached them

    def on_alloc(i: int, total: int) -> None:
        if total > best[0]:
            best[:] = [total, i]

    _replay(events, len(events), on_alloc)
    return best[0], _replay(events, best[1] + 1, lambda i, total: None)  # a second pass, not a copy per new peak


def _replay(events: list[dict], stop: int, on_alloc) -> dict[int, dict]:
    """The blocks live after events[:stop], calling on_alloc(index, live bytes) after each allocation."""
    live: dict[int, dict] = {}
    total = 0
    for i, e in enumerate(events[:stop]):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            on_alloc(i, total)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    return live


def by_site(blocks: dict[int, dict], key=site) -> pd.DataFrame:
    """Bytes and blocks per `key(frames)` (default: the allocation site), largest first."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for b in blocks.values():
        r = rows[key(b.get("frames", []))]
        r[0] += b["size"]
        r[1] += 1
    df = pd.DataFrame([(s, n, c) for s, (n, c) in rows.items()], columns=["site", "bytes", "blocks"])
    df["gib"] = df["bytes"] / 2**30
    return df.sort_values("bytes", ascending=False).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--expand", type=int, default=0, help="break the N largest sites down by innermost frame")
    ap.add_argument("--out", type=Path, default=None, help="CSV of every site at the peak")
    ap.add_argument("overrides", nargs="*", help="run.py's arguments (after --)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memory_peak needs CUDA: the caching allocator's history exists only there")
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    sys.argv = ["run.py", *args.overrides]
    try:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "run.py"), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            print(f"run.py exited with {exc.code}; the peak below is up to that point")
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snapshot["device_traces"] for e in trace]
    peak, blocks = live_at_peak(events)
    df = by_site(blocks)
    print(f"peak {peak / 2**30:.3f} GiB live over {len(events)} events; by allocation site:")
    print(df.head(args.top).to_string(index=False, formatters={"gib": "{:.3f}".format}))
    for name in df["site"].head(args.expand):
        inner = by_site({a: b for a, b in blocks.items() if site(b.get("frames", [])) == name}, innermost)
        print(f"\n{name}, by innermost frame:")
        print(inner.head(args.top).to_string(index=False, formatters={"gib": "{:.3f}".format}))
    if args.out is not None:
        df.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
