"""
MoE-Infinity's expert activation tracing (Xue et al., arXiv 2401.14361): per-sequence Expert
Activation Matrices (EAMs), a bounded collection of past EAMs, trace matching and prefetch.

Terms (L = number of MoE layers, indexed by position in `moe_layers`, E = experts per layer):
- **EAM** `[L, E]` float counts for one sequence: entry (i, e) = the number of target forwards
  of this sequence in which MoE layer i routed expert e (the *union* of the forward's tokens,
  one count per forward; see "simplified" below).
- **EAMC** (`EamCollection`): up to `capacity` past EAMs. *Persistent* entries (warmed from
  earlier runs' traces) are never replaced; when full, a new EAM replaces the least-accessed
  non-persistent entry (an entry's access count is 1 when it is added and +1 each time it is
  the best match), as in the reference implementation's `ExpertTracer.finish_entry`.
- **Matching**: cosine similarity between the current (partial) EAM and each stored EAM, per
  layer, averaged over the layers the current sequence has already routed (rows with a
  non-zero sum); the stored EAM with the highest mean wins (ties: the lowest index).
- **Prediction** (`plan_prefetch`): from the best match M, for the next `depth` MoE layers
  x = i+1 .. i+depth (i = the layer being computed), the experts with non-zero counts in M[x],
  at most `width` per layer (highest count first), each scored count share x layer decay
  `1 - d / (L + 1)` (d = x - i: MoE-Infinity's `ExpertPredictor` decay). The best `budget`
  candidates over all those layers are prefetched, nearer layers submitted first.

`EamPredictor` is the runtime side. A new sequence starts at `begin_step(0)` (the engine's
prefill step); a forward pre-hook on the target model catches one that no step announced (the
target called with an empty KV cache; graph-safe, as no such forward is ever captured). The
finished sequence's EAM then joins the collection and a fresh one starts. Hooks on every experts
call (`spmoe.models.experts.on_experts_call`: kept by piecewise CUDA graphs) add the call's routes
(top_k_index [T, A]: layer l's routed experts) to the current EAM, match, and submit
`PrefetchRequest`s (one [1, n] row per predicted layer, most probable expert first, position 0) for
the next layers. At
`begin_step` of a decode step (before the draft runs, with SD) the first `depth` MoE layers of
the coming forward are predicted the same way, from everything routed so far.
`load_trace_eams` builds one EAM per prompt from a run's `trace.jsonl`, to warm the collection.

Faithful: EAM per sequence, bounded EAMC with persistent warm entries and least-access
replacement, per-layer cosine matching of the partial EAM, predictions for upcoming layers
from the matched trace with the linear layer decay, priority-ordered submission, re-matching
at every layer.
Simplified, and why:
- Counts are per forward (the union of its tokens' experts), not per token: a trace file records
  only the union each layer needed per step, so live and warmed EAMs must count the same way;
  under SD the union is also exactly what a verify forward loads. Batch-1 decoding without SD
  counts the same either way. Rejected draft tokens' routes count (they were loaded).
- Matching averages over every layer the current sequence has routed. The reference instead
  sets the stored EAMs' already-executed layers to uniform rows, which adds the same constant
  for every stored EAM, so it effectively matches on the layers after the current one (with
  the counts earlier tokens left there) and cannot discriminate during the first forward.
- The reference enqueues every expert with a non-zero predicted count for all remaining layers
  and lets the cache capacity cut the list; here prefetch is bounded (`depth`, `width`,
  `budget`), because the shared provider protects prefetched experts until their layer runs,
  and an unbounded list would pin the whole cache.
- Layers of the next forward are predicted at `begin_step` rather than at the end of the
  previous forward (a request must carry the step that will consume it).
- The EAMC lives on the host (the reference keeps it on the GPU): it is L x E floats per entry
  and the match is one small matrix product per layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from spmoe.hooks import HookOwner, mark_graph_safe
from spmoe.models.experts import on_experts_call
from spmoe.offload.prefetch import PrefetchProvider, PrefetchRequest

DEFAULT_CAPACITY = 64
DEFAULT_DEPTH = 3


class EamCollection:
    """Up to `capacity` past EAMs [L, E] with MoE-Infinity's replacement rule (see module doc)."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"an EAM collection needs capacity >= 1, got {capacity}")
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self.matrices = torch.zeros(capacity, num_layers, num_experts)  # [C, L, E] raw counts
        self._unit = torch.zeros(capacity, num_layers, num_experts)  # rows scaled to unit norm (0 rows stay 0)
        self.access = [0] * capacity
        self.persistent = [False] * capacity
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, matrix: torch.Tensor, persistent: bool = False) -> int | None:
        """Store one EAM; returns its index, or None when it was not stored (empty, or the
        collection is full of persistent entries)."""
        if matrix.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"EAM shape {tuple(matrix.shape)} != {(self.num_layers, self.num_experts)}")
        if not bool((matrix > 0).any()):
            return None
        if self.size < self.capacity:
            idx = self.size
            self.size += 1
        else:
            free = [i for i in range(self.capacity) if not self.persistent[i]]
            if not free:
                return None
            idx = min(free, key=lambda i: self.access[i])  # least accessed; ties: the lowest index
        self.matrices[idx] = matrix.float()
        self._unit[idx] = _unit_rows(matrix.float())
        self.access[idx] = 1
        self.persistent[idx] = persistent
        return idx

    def similarity(self, current: torch.Tensor) -> torch.Tensor | None:
        """[size] mean per-layer cosine similarity over the layers `current` has routed (None: none)."""
        seen = current.sum(-1) > 0  # [L]
        if self.size == 0 or not bool(seen.any()):
            return None
        cos = (self._unit[: self.size] * _unit_rows(current.float())[None]).sum(-1)  # [size, L]
        return cos[:, seen].mean(-1)

    def match(self, current: torch.Tensor) -> int | None:
        """Index of the stored EAM most similar to `current` (its access count +1), or None."""
        sim = self.similarity(current)
        if sim is None:
            return None
        idx = int(torch.argmax(sim))  # the first maximum
        self.access[idx] += 1
        return idx


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def layer_decay(distance: int, num_layers: int) -> float:
    """MoE-Infinity's ExpertPredictor weight of a layer `distance` MoE layers ahead."""
    return 1.0 - distance / (num_layers + 1)


def plan_prefetch(matrix: torch.Tensor, current: int, depth: int, width: int, budget: int,
                  ) -> list[tuple[int, list[int]]]:
    """What to prefetch after MoE layer index `current` (-1: before the first layer) given the
    matched EAM `matrix` [L, E]: [(layer index, experts most probable first)], nearer layers
    first, at most `width` experts per layer and `budget` in all (see module doc)."""
    num_layers = matrix.shape[0]
    cands: list[tuple[float, int, int, int]] = []  # (score, distance, rank in layer, expert)
    for d in range(1, depth + 1):
        i = current + d
        if i >= num_layers:
            break
        row = matrix[i]
        total = float(row.sum())
        if total <= 0:
            continue
        counts = row.tolist()
        ranked = sorted((e for e in range(len(counts)) if counts[e] > 0), key=lambda e: (-counts[e], e))[:width]
        cands += [(counts[e] / total * layer_decay(d, num_layers), d, r, e) for r, e in enumerate(ranked)]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen = sorted(cands[:budget], key=lambda c: (c[1], c[2]))  # nearer layers first, then by rank
    out: list[tuple[int, list[int]]] = []
    for _, d, _, e in chosen:
        if not out or out[-1][0] != current + d:
            out.append((current + d, []))
        out[-1][1].append(e)
    return out


def load_trace_eams(path: str | Path, moe_layers: Iterable[int], num_experts: int) -> list[torch.Tensor]:
    """One EAM [L, E] per prompt (in order of first appearance) from a run's `trace.jsonl`:
    every step record adds 1 to (layer, e) for each expert e its layer events `needed`
    (prefill included). Layers that are not MoE layers and out-of-range ids are skipped."""
    index = {layer: i for i, layer in enumerate(moe_layers)}
    eams: dict[int, torch.Tensor] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, layers = record["prompt_idx"], record["layers"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: not a step record of trace.jsonl ({exc!r})") from None
            eam = eams.setdefault(prompt, torch.zeros(len(index), num_experts))
            for ev in layers:
                i = index.get(ev["layer"])
                if i is None:
                    continue
                for e in set(ev["needed"]):
                    if 0 <= e < num_experts:
                        eam[i, e] += 1
    return list(eams.values())


class EamPredictor(HookOwner):
    """Step listener + hooks: trace the current sequence's EAM, match it, prefetch (module doc).

    `on_layer(layer, experts)` and `on_new_sequence()` callbacks (e.g. the priority cache
    policy) see every layer's routed experts and every sequence boundary."""

    def __init__(self, target: nn.Module, provider: PrefetchProvider, moe_layers: tuple[int, ...],
                 num_experts: int, collection: EamCollection, width: int, budget: int,
                 depth: int = DEFAULT_DEPTH,
                 on_layer: Callable[[int, list[int]], None] | None = None,
                 on_new_sequence: Callable[[], None] | None = None):
        if width < 1 or budget < 1 or depth < 1:
            raise ValueError(f"width, budget and depth must be >= 1, got {width}, {budget}, {depth}")
        self.provider = provider
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self.collection = collection
        self.width, self.budget, self.depth = width, budget, depth
        self.on_layer, self.on_new_sequence = on_layer, on_new_sequence
        self.current = torch.zeros(len(self.moe_layers), num_experts)  # [L, E] this sequence's EAM
        self.last_match: int | None = None  # collection index of the latest best match
        self._index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._handles = [target.register_forward_pre_hook(
            mark_graph_safe(lambda m, a, kw: self._before_forward(m, a, kw)), with_kwargs=True)]
        self._handles += [on_experts_call(target.model.layers[layer].mlp.experts,
                                          lambda h, i, w, layer=layer: self._before_layer(layer, i))
                          for layer in self.moe_layers]

    # -- sequence and layer tracing --------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        kv = kwargs.get("cache", kwargs.get("past_key_values"))
        if (kv is None or kv.get_seq_length() == 0) and bool((self.current > 0).any()):
            self.finish_sequence()  # a new sequence that no begin_step(0) announced

    def finish_sequence(self) -> None:
        """Move the current EAM into the collection (if it routed anything) and start a new one."""
        if bool((self.current > 0).any()):
            self.collection.add(self.current.clone())
        self.current.zero_()
        if self.on_new_sequence is not None:
            self.on_new_sequence()

    def _before_layer(self, layer: int, top_k_index: torch.Tensor) -> None:
        i = self._index[layer]
        ids = [e for e in torch.unique(top_k_index.detach().cpu()).tolist() if 0 <= e < self.num_experts]
        self.current[i, ids] += 1
        if self.on_layer is not None:
            self.on_layer(layer, ids)
        self._prefetch(i)

    # -- prediction ------------------------------------------------------------------------------

    def _prefetch(self, current: int) -> None:
        idx = self.collection.match(self.current)
        if idx is None:
            return
        self.last_match = idx
        step = self.provider.step
        for i, experts in plan_prefetch(self.collection.matrices[idx], current, self.depth, self.width, self.budget):
            ids = torch.tensor([experts], dtype=torch.long)  # [1, n] host tensor, most probable first
            self.provider.submit(PrefetchRequest(step, self.moe_layers[i], 0, ids))

    def begin_step(self, step: int) -> None:  # after the provider's begin_step (listener order)
        if step == 0:  # the prefill of a new sequence (step 0 = prefill, as in the trace records)
            self.finish_sequence()
            return  # nothing routed yet: nothing to match
        self._prefetch(-1)

    def end_step(self) -> None:
        pass

