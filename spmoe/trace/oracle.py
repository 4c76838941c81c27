"""
Oracle bytes and efficiency ratios (DESIGN.md section 5).

- Belady's optimal replacement with perfect foresight: on a miss with a full cache, evict the
  resident expert whose next use is farthest in the future (never-again first). `belady_misses`
  replays a run's own expert access sequence (the experts each forward needed, in order) with the
  run's number of slots and counts the misses of the accesses marked as counted (decode steps;
  prefill accesses warm the cache but are not counted, as in the run's own metrics).
- oracle bytes = Belady misses x expert bytes; policy efficiency = bytes moved / oracle bytes
  (>= 1 unless the run's cache is larger than the oracle's).
- runtime efficiency = TPOT / (H2D bytes per token / pinned bandwidth + compute that cannot
  overlap), with the compute taken from the GPU-resident run of the same decoding mode.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from spmoe.trace.records import StepRecord
from spmoe.types import ExpertKey


def access_sequence(records_by_prompt: Iterable[Sequence[StepRecord]]) -> list[tuple[ExpertKey, bool]]:
    """(key, counted) for every expert every forward needed, in run order; counted = decode step."""
    out = []
    for records in records_by_prompt:
        for r in records:
            for ev in r.layers:
                out.extend(((ev.layer, e), r.phase == "decode") for e in ev.needed)
    return out


def belady_misses(accesses: Sequence[tuple[ExpertKey, bool]], num_slots: int) -> int:
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    never = len(accesses)
    next_use = [never] * len(accesses)
    last: dict[ExpertKey, int] = {}
    for i in range(len(accesses) - 1, -1, -1):
        key = accesses[i][0]
        next_use[i] = last.get(key, never)
        last[key] = i
    resident: dict[ExpertKey, int] = {}  # key -> index of its next use
    misses = 0
    for i, (key, counted) in enumerate(accesses):
        if key not in resident:
            misses += counted
            if len(resident) >= num_slots:
                victim = max(resident, key=resident.__getitem__)
                del resident[victim]
        resident[key] = next_use[i]
    return misses


def runtime_efficiency(tpot_ms: float, h2d_bytes_per_token: float, pinned_gb_per_s: float, compute_ms: float) -> float:
    floor_ms = h2d_bytes_per_token / (pinned_gb_per_s * 1e6) + compute_ms
    return tpot_ms / floor_ms
