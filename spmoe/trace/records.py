"""
Trace schema: the records the engine and the expert provider emit.

- `LayerEvents`: for one forward of one MoE layer, the experts it needed and which of them were
  hits (resident before needed) or misses (loaded on demand). Prefetch kinds come with the
  prefetching methods; `host` lists the experts computed on the host instead (spmoe_plus), which
  are not in `needed` (the lossless check's reference computes exactly those on the host too).
- `StepRecord`: one engine step (prefill, one decode token, or one draft+verify step), with
  its wall time, the tokens it emitted, transfer totals and its per-layer events.
Times are milliseconds, sizes bytes. Records are plain dataclasses; files are written by the
runner (`trace.jsonl`, one StepRecord per line).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LayerEvents:
    """One forward of one MoE layer. `needed` = hits + prefetch_hits + late + misses (disjoint)."""

    layer: int
    needed: list[int]
    hits: list[int]  # resident before needed, not brought by this step's prefetch
    misses: list[int]  # loaded on demand
    prefetch_hits: list[int] = field(default_factory=list)  # brought by a prefetch, landed in time
    late: list[int] = field(default_factory=list)  # prefetched, still in flight when needed (waited)
    predicted: list[int] | None = None  # experts the predictor named for this layer and step
    top1_correct: int = 0  # verify positions whose top-1 expert the predictor named first
    top1_total: int = 0
    host: list[int] = field(default_factory=list)  # computed on the host from the store, not served by the cache


@dataclass
class StepRecord:
    prompt_idx: int
    step: int  # 0 = prefill
    phase: str  # prefill | decode
    pos: int  # sequence length before the step
    num_emitted: int  # tokens this step emitted
    t_ms: float  # wall time at the end of the step, since the prompt started
    step_ms: float
    h2d_bytes: int = 0
    copy_ms: float = 0.0
    stall_ms: float = 0.0
    num_prefetched: int = 0  # prefetch copies issued during the step
    num_dropped: int = 0  # prefetch requests dropped (too late, or no evictable slot)
    num_wasted: int = 0  # prefetched experts evicted (or left at the end) without being used
    sync_wait_ms: float = 0.0  # host blocked on the device for the target's logits (host time = step_ms - this)
    num_drafted: int | None = None
    num_accepted: int | None = None
    draft_ids: list[int] | None = None  # the drafted tokens the step verified (the lossless check repeats the step)
    draft_ms: float | None = None
    verify_ms: float | None = None
    layers: list[LayerEvents] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ExpertEventLog:
    """Collects LayerEvents from the provider; the engine drains it once per step.

    `record_routes` keeps a layer's routes as a device tensor (every needed expert a hit) and
    resolves it at `drain`, all of a step's in one device->host copy, so recording needs no sync
    during the forward. Events keep the order in which they were recorded."""

    def __init__(self) -> None:
        self._events: list[LayerEvents | tuple[int, torch.Tensor, int]] = []

    def record(self, layer: int, needed: list[int], hits: list[int], misses: list[int], **extra) -> None:
        self._events.append(LayerEvents(layer, needed, hits, misses, **extra))

    def mark_host(self, layer: int, expert_ids: list[int]) -> None:
        """The layer forward recorded last also computed `expert_ids` on the host (a record of its own
        when the last one is not that layer's)."""
        last = self._events[-1] if self._events else None
        if isinstance(last, LayerEvents) and last.layer == layer:
            last.host = list(expert_ids)
        else:
            self._events.append(LayerEvents(layer, [], [], [], host=list(expert_ids)))

    def record_routes(self, layer: int, top_k_index: torch.Tensor, num_experts: int) -> None:
        """A layer whose routed experts [T, A] were all resident; ids outside [0, num_experts) are no expert."""
        self._events.append((layer, top_k_index, num_experts))

    def pending(self) -> list:
        """The entries recorded since the last drain, left in place (unresolved, as `take` returns them)."""
        return list(self._events)

    def take(self) -> list:
        """Remove and return the entries recorded since the last drain, unresolved (a CUDA graph keeps
        its captured forward's route entries and `extend`s the log with them after each replay)."""
        out, self._events = self._events, []
        return out

    def extend(self, entries: list) -> None:
        self._events.extend(entries)

    def drain(self) -> list[LayerEvents]:
        out = self.take()
        deferred = [ev for ev in out if isinstance(ev, tuple)]
        if not deferred:
            return out
        flat = torch.cat([idx.flatten() for _, idx, _ in deferred]).cpu().tolist()
        resolved, start = [], 0
        for layer, idx, num_experts in deferred:
            ids = sorted({e for e in flat[start:start + idx.numel()] if 0 <= e < num_experts})
            start += idx.numel()
            resolved.append(LayerEvents(layer, ids, list(ids), []))
        it = iter(resolved)
        return [next(it) if isinstance(ev, tuple) else ev for ev in out]
