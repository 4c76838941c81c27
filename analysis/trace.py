"""
Per-token analysis of a run's `trace.jsonl` (one `spmoe.trace.records.StepRecord` per line).

Terms (DESIGN.md section 5; decode steps only, prefill is TTFT):
- A prompt's *decode tokens* = its emitted tokens - 1 (the first comes from prefill);
  its TPOT = (t_ms of the last step - t_ms of prefill) / decode tokens; run values are means over
  prompts, as `spmoe.trace.metrics.summarize` computes `tpot_ms`.
- *TPOT breakdown*, per decode token: `draft_ms` (the draft's proposals), `stall_ms` (the compute
  stream waiting for expert copies), `verify_ms` = verification compute = the verify span minus the
  stall in it (a non-SD step is all verify span), `other_ms` = TPOT - the three: host time between
  and around the timed spans. The four add up to TPOT exactly (`other_ms` may be slightly negative
  only if stall was also counted during drafting).
- Per layer: needed = hits + prefetch hits + late + misses (disjoint); hit rate = (hits + prefetch
  hits) / needed; prefetch coverage = (prefetch hits + late) / needed; predictor recall =
  |predicted & needed| / |needed| over the steps the layer was predicted; top-1 accuracy =
  top1_correct / top1_total.
- Bytes per emitted token = decode H2D bytes / decode tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

BREAKDOWN = ("draft_ms", "verify_ms", "stall_ms", "other_ms")


def read_trace(run_dir) -> list[dict]:
    """The step records of `run_dir/trace.jsonl` (or of a trace file given directly)."""
    path = Path(run_dir)
    path = path / "trace.jsonl" if path.is_dir() else path
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def by_prompt(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in records:
        out.setdefault(r["prompt_idx"], []).append(r)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in out.items()}


def step_table(records: list[dict]) -> pd.DataFrame:
    """One row per decode step: timings, tokens, bytes and expert-event counts; `emitted_total` = tokens
    emitted so far in the run (prefill tokens included), the x-axis of per-step charts."""
    rows, emitted = [], 0
    for prompt, steps in by_prompt(records).items():
        for r in steps:
            emitted += r["num_emitted"]
            if r["phase"] == "prefill":
                continue
            layers = r["layers"]
            rows.append({
                "prompt_idx": prompt, "step": r["step"], "emitted_total": emitted, "num_emitted": r["num_emitted"],
                "step_ms": r["step_ms"], "ms_per_token": r["step_ms"] / r["num_emitted"],
                "draft_ms": r.get("draft_ms"), "verify_ms": r.get("verify_ms"), "stall_ms": r["stall_ms"],
                "num_drafted": r.get("num_drafted"), "num_accepted": r.get("num_accepted"),
                "h2d_bytes": r["h2d_bytes"],
                "hits": sum(len(ev["hits"]) for ev in layers), "misses": sum(len(ev["misses"]) for ev in layers),
                "prefetch_hits": sum(len(ev.get("prefetch_hits", [])) for ev in layers),
                "late": sum(len(ev.get("late", [])) for ev in layers),
                "wasted": r.get("num_wasted", 0), "prefetched": r.get("num_prefetched", 0),
            })
    return pd.DataFrame(rows)


def tpot_breakdown(records: list[dict]) -> dict:
    """`tpot_ms` and its four parts (BREAKDOWN), ms per decode token, mean over prompts."""
    parts = {k: [] for k in ("tpot_ms",) + BREAKDOWN}
    for steps in by_prompt(records).values():
        decode = [r for r in steps if r["phase"] != "prefill"]
        tokens = sum(r["num_emitted"] for r in steps) - 1
        if tokens < 1 or not decode:
            continue
        tpot = (steps[-1]["t_ms"] - steps[0]["t_ms"]) / tokens
        draft = sum(r.get("draft_ms") or 0.0 for r in decode) / tokens
        stall = sum(r["stall_ms"] for r in decode) / tokens
        span = sum(r["verify_ms"] if r.get("verify_ms") is not None else r["step_ms"] for r in decode) / tokens
        for key, value in (("tpot_ms", tpot), ("draft_ms", draft), ("verify_ms", span - stall), ("stall_ms", stall),
                           ("other_ms", tpot - draft - span)):
            parts[key].append(value)
    return {k: sum(v) / len(v) if v else None for k, v in parts.items()}


def step_latency(records: list[dict]) -> dict:
    """Distribution of decode step latency (ms) and of ms per emitted token within a step."""
    steps = step_table(records)
    if steps.empty:
        return {}
    out = {"num_steps": len(steps)}
    for col in ("step_ms", "ms_per_token"):
        s = steps[col]
        out.update({f"{col}_mean": s.mean(), f"{col}_p50": s.quantile(0.5), f"{col}_p90": s.quantile(0.9),
                    f"{col}_p99": s.quantile(0.99), f"{col}_max": s.max()})
    return out


def layer_table(records: list[dict]) -> pd.DataFrame:
    """One row per MoE layer over decode steps: event counts, hit rate, coverage, recall, top-1 accuracy."""
    acc: dict[int, dict] = {}
    for r in records:
        if r["phase"] == "prefill":
            continue
        for ev in r["layers"]:
            a = acc.setdefault(ev["layer"], dict.fromkeys(
                ("needed", "hits", "prefetch_hits", "late", "misses", "recall_hit", "recall_n", "top1_ok",
                 "top1_n"), 0))
            a["needed"] += len(ev["needed"])
            a["hits"] += len(ev["hits"])
            a["misses"] += len(ev["misses"])
            a["prefetch_hits"] += len(ev.get("prefetch_hits", []))
            a["late"] += len(ev.get("late", []))
            if ev.get("predicted") is not None:
                a["recall_hit"] += len(set(ev["predicted"]) & set(ev["needed"]))
                a["recall_n"] += len(ev["needed"])
            a["top1_ok"] += ev.get("top1_correct", 0)
            a["top1_n"] += ev.get("top1_total", 0)
    rows = []
    for layer, a in sorted(acc.items()):
        n = a["needed"]
        rows.append({"layer": layer, **{k: a[k] for k in ("needed", "hits", "prefetch_hits", "late", "misses")},
                     "hit_rate": (a["hits"] + a["prefetch_hits"]) / n if n else None,
                     "prefetch_coverage": (a["prefetch_hits"] + a["late"]) / n if n else None,
                     "predictor_recall": a["recall_hit"] / a["recall_n"] if a["recall_n"] else None,
                     "predictor_top1": a["top1_ok"] / a["top1_n"] if a["top1_n"] else None})
    return pd.DataFrame(rows)


def bytes_per_token(records: list[dict]) -> float | None:
    """Decode H2D bytes per decode token (prefill traffic excluded, as `h2d_bytes_per_token`)."""
    tokens = sum(sum(r["num_emitted"] for r in steps) - 1 for steps in by_prompt(records).values())
    moved = sum(r["h2d_bytes"] for r in records if r["phase"] != "prefill")
    return moved / tokens if tokens > 0 else None


def per_run(runs: pd.DataFrame, fn) -> pd.DataFrame:
    """`fn(records)` for each run of the tidy table that has a trace, with the run's identifying columns:
    a dict result becomes one row, a frame its rows."""
    keys = [c for c in ("experiment", "variant", "method", "model", "dataset", "card", "routing", "run_dir") if c in runs]
    parts = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / "trace.jsonl"
        if not path.is_file():
            continue
        result = fn(read_trace(path))
        frame = pd.DataFrame([result]) if isinstance(result, dict) else result
        if frame.empty:
            continue
        for key in keys:
            frame[key] = run[key]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=keys)
