"""
Engine-owned host time in a cProfile of decode (`experiments.bench_layer_grouped --profile`).

Terms: a *frame* is one profiled function. *Engine* frames are Python functions under `spmoe/` or
`baselines/` plus the non-torch builtins (dict/list/min/sorted ...) they call, charged to them;
*torch* = torch's operators and tensor methods, called from anywhere (the tiny model's compute, and
on a GPU the launches); *other* = everything else (transformers' modules, nn.Module dispatch, the
standard library). Times are the profiler's self times (`tottime`), so the three parts add up to
the profiled total; the profiler inflates Python calls, so compare profiles with profiles and take
wall times from unprofiled runs.
"""

from __future__ import annotations

import pstats

ENGINE_DIRS = ("/spmoe/", "/baselines/")


def _is_engine(func: tuple) -> bool:
    return any(d in func[0] for d in ENGINE_DIRS)


def _is_torch(func: tuple) -> bool:
    return func[0] == "~" and "torch" in func[2] or "/torch/" in func[0]


def split(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of self time: engine (Python + the builtins it calls), torch, other."""
    out = {"engine": 0.0, "torch": 0.0, "other": 0.0}
    for func, (_, _, tt, _, callers) in stats.stats.items():
        if _is_engine(func):
            out["engine"] += tt
        elif _is_torch(func):
            out["torch"] += tt
        elif func[0] == "~":  # a builtin: charge each caller its share
            for caller, (_, _, ctt, _) in callers.items():
                out["engine" if _is_engine(caller) else "other"] += ctt
        else:
            out["other"] += tt
    return out


def engine_rows(stats: pstats.Stats, top: int = 25) -> list[tuple[str, int, float, float]]:
    """(function, calls, self s incl. builtins it calls, cumulative s) of the engine's frames, by self time."""
    builtin_s: dict[tuple, float] = {}  # caller -> self time of the non-torch builtins it called
    for callee, (_, _, _, _, callers) in stats.stats.items():
        if callee[0] == "~" and not _is_torch(callee):
            for caller, (_, _, ctt, _) in callers.items():
                builtin_s[caller] = builtin_s.get(caller, 0.0) + ctt
    rows = []
    for func, (_, nc, tt, ct, _) in stats.stats.items():
        if not _is_engine(func):
            continue
        own = tt + builtin_s.get(func, 0.0)
        rows.append((f"{func[0].split('/work/main/')[-1]}:{func[1]}({func[2]})", nc, own, ct))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def report(stats: pstats.Stats, num_tokens: int, title: str) -> str:
    """Markdown: the engine/torch/other split and the top engine frames, in ms per decode token."""
    per = 1e3 / max(num_tokens, 1)
    parts = split(stats)
    lines = [f"### {title}", "", f"profiled {num_tokens} tokens; ms per token (profiler-inflated): "
             + ", ".join(f"{k} {v * per:.2f}" for k, v in parts.items()), "",
             "| engine frame | calls/token | self ms/token (+ builtins) | cumulative ms/token |", "|---|---|---|---|"]
    for name, nc, own, ct in engine_rows(stats):
        lines.append(f"| `{name}` | {nc / max(num_tokens, 1):.1f} | {own * per:.3f} | {ct * per:.3f} |")
    return "\n".join(lines)
