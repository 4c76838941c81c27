"""
Engine-owned host time in a cProfile of decode (`experiments.bench_layer_grouped --profile`).

Terms: a *frame* is one profiled function. *Engine* frames are Python functions under `spmoe/` or
`baselines/` plus the non-torch builtins (dict/list/min/sorted ...) they call, charged to them;
*torch* = torch's operators and tensor methods, called from anywhere (the tiny model's compute, and
on a GPU the launches); *other* = everything else (transformers' modules, nn.Module dispatch, the
standard library). Times are the profiler's self times (`tottime`, wall clock: profile on a quiet
machine; a CPU-time timer costs a system call per event here and swamps the profile), so the three parts add up to
the profiled total; the profiler inflates Python calls, so compare profiles with profiles and take
wall times from unprofiled runs. `sections` times the offloaded experts path's parts with
`time.perf_counter` instead (no profiler): the provider's service (`serve_layer`: lookups, admissions,
copies issued, pins, events), the slot map, the release and the expert compute (`SECTIONS`); on the CPU the
copies themselves are synchronous and land inside `serve_layer`.
"""

from __future__ import annotations

import contextlib
import importlib
import pstats
import time

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


SECTIONS = (("spmoe.models.experts", "OffloadedExperts", "compute"),
            ("spmoe.models.experts", "OffloadedExperts", "_serve"),
            ("spmoe.offload.provider", "OnDemandProvider", "serve_layer"),
            ("spmoe.offload.prefetch", "PrefetchProvider", "serve_layer"),
            ("spmoe.offload.transfer", "TransferEngine", "load"),
            ("spmoe.offload.layer_slots", "LayerSlots", "__init__"),
            ("spmoe.offload.layer_slots", "LayerSlots", "view"),
            ("spmoe.offload.layer_slots", "LayerSlots", "release"),
            ("spmoe.runtime.piecewise", "ExpertsGraph", "run"),
            ("spmoe.models.experts", None, "grouped_expert_mlp"))


@contextlib.contextmanager
def sections(totals_s: dict[str, float]):
    """Time the per-layer sections (`time.perf_counter`, no profiler) into `totals_s` (name -> seconds):
    the experts module's whole call and its service (`_serve`: the routes' sync, the provider), the
    provider's service and its copies, the layer slots (pins' ready waits, slot map, release), the
    call site's expert graph and the expert compute launched eagerly. Sections nest."""
    saved = []
    for module_name, cls_name, attr in SECTIONS:
        owner = importlib.import_module(module_name)
        owner = getattr(owner, cls_name) if cls_name else owner
        fn = getattr(owner, attr)
        name = f"{cls_name or module_name.rsplit('.', 1)[-1]}.{attr}"

        def timed(*a, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                totals_s[_name] = totals_s.get(_name, 0.0) + time.perf_counter() - t0

        saved.append((owner, attr, fn))
        setattr(owner, attr, timed)
    try:
        yield totals_s
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def sections_table(totals_s: dict[str, float], num_tokens: int, title: str) -> str:
    per = 1e3 / max(num_tokens, 1)
    lines = [f"### {title}: perf_counter sections (unprofiled)", "", "| section | ms/token |", "|---|---|"]
    lines += [f"| `{name}` | {s * per:.2f} |" for name, s in totals_s.items()]
    return "\n".join(lines)
