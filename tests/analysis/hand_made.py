"""Hand-made run directories and traces for the analysis tests: every number is chosen, so results are exact."""

from __future__ import annotations

import json
from pathlib import Path

BASE = {"model": "mixtral", "dataset": "humaneval", "hardware": "rtx4090", "hardware_emulated": True,
        "routing": "model", "weights": "random", "draft": "mistral_7b", "num_draft_tokens": 1}


def write_run(root: Path, name: str, trace: list[dict] | None = None, **summary) -> Path:
    """A finished run dir `root/name` with summary.json = BASE updated by `summary`, and trace.jsonl if given."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if trace is not None:
        (run_dir / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trace))
    (run_dir / "summary.json").write_text(json.dumps({**BASE, **summary}))
    return run_dir


def layer(idx: int, needed, hits=(), misses=(), prefetch_hits=(), late=(), predicted=None, top1=(0, 0)) -> dict:
    return {"layer": idx, "needed": list(needed), "hits": list(hits), "misses": list(misses),
            "prefetch_hits": list(prefetch_hits), "late": list(late),
            "predicted": None if predicted is None else list(predicted), "top1_correct": top1[0], "top1_total": top1[1]}


def step(prompt_idx: int, idx: int, t_ms: float, step_ms: float, emitted: int = 1, draft_ms=None, verify_ms=None,
         stall_ms: float = 0.0, h2d_bytes: int = 0, layers=(), drafted=None, accepted=None, **extra) -> dict:
    return {"prompt_idx": prompt_idx, "step": idx, "phase": "prefill" if idx == 0 else "decode", "pos": 0,
            "num_emitted": emitted, "t_ms": t_ms, "step_ms": step_ms, "h2d_bytes": h2d_bytes, "copy_ms": 0.0,
            "stall_ms": stall_ms, "num_prefetched": extra.get("num_prefetched", 0), "num_dropped": 0,
            "num_wasted": extra.get("num_wasted", 0), "num_drafted": drafted, "num_accepted": accepted,
            "draft_ms": draft_ms, "verify_ms": verify_ms, "layers": list(layers)}


def sd_trace() -> list[dict]:
    """Two prompts under SD (k = 2), exact timings.

    Prompt 0: prefill at 100 ms, then 2 steps emitting 3 + 2 tokens (6 tokens) ending at 200 ms:
      TPOT = 100 / 5 = 20 ms; draft 10+10, verify 30+40 (stall 5+15), other 100 - 90 = 10.
    Prompt 1: prefill at 50 ms, one step emitting 3 tokens ending at 110 ms: TPOT = 60 / 3 = 20 ms;
      draft 20, verify 36 (stall 6), other 4.
    """
    l0 = layer(0, needed=[1, 2], hits=[1], prefetch_hits=[2], predicted=[2, 3], top1=(1, 2))
    l1 = layer(1, needed=[4, 5, 6], misses=[4, 5], late=[6], predicted=[6], top1=(0, 3))
    l1b = layer(1, needed=[4], hits=[4], predicted=[4], top1=(3, 3))
    return [
        step(0, 0, 100.0, 100.0, h2d_bytes=999, layers=[layer(0, [1], misses=[1])]),
        step(0, 1, 145.0, 45.0, emitted=3, draft_ms=10.0, verify_ms=30.0, stall_ms=5.0, h2d_bytes=300,
             layers=[l0, l1], drafted=2, accepted=2),
        step(0, 2, 200.0, 55.0, emitted=2, draft_ms=10.0, verify_ms=40.0, stall_ms=15.0, h2d_bytes=100,
             layers=[l1b], drafted=2, accepted=1),
        step(1, 0, 50.0, 50.0),
        step(1, 1, 110.0, 60.0, emitted=3, draft_ms=20.0, verify_ms=36.0, stall_ms=6.0, h2d_bytes=200,
             layers=[layer(0, [1], hits=[1])], drafted=2, accepted=2),
    ]


def nosd_trace() -> list[dict]:
    """One prompt without SD: prefill at 10 ms, 4 decode steps of 25 ms, stall 5 each: TPOT 25, other 0."""
    steps = [step(0, 0, 10.0, 10.0)]
    for i in range(1, 5):
        steps.append(step(0, i, 10.0 + 25.0 * i, 25.0, stall_ms=5.0, h2d_bytes=50,
                          layers=[layer(0, [i], misses=[i])]))
    return steps
