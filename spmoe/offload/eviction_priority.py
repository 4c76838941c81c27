"""
MoE-Infinity's priority cache policy (Xue et al., arXiv 2401.14361; `priority_score` in the
reference code): an `EvictionPolicy` whose victim is the resident expert with the lowest score

    score(x, e) = topo(x) * (g(x, e) + 1) * (s(x, e) + 1) / (S(x) + E)

- `topo(x)`: layer proximity. With L MoE layers, the layer being computed c (`set_layer`) and
  d = ((x - c - 1) mod L) + 1 in 1..L the number of MoE layers until layer x runs next,
  topo = 1 - (d - 1) / L: the next layer scores 1, the layer just computed (needed again only
  one whole forward later) scores 1 / L. Distances are cyclic because decoding runs the layers
  over and over.
- `g(x, e)`: global activation frequency, the number of forwards in this run (all sequences)
  in which layer x routed expert e (`record`).
- `s(x, e) / S(x)`: the current sequence's EAM row, normalised per layer (S(x) = its row sum);
  `new_sequence` clears it.
Ties go to the least recently touched key. Scores only rank keys; their absolute value means
nothing. Pure bookkeeping: no tensors, no device calls.

Faithful: the product of frequency, layer topology and the current sequence's normalised EAM;
already-passed layers rank lowest, upcoming layers highest.
Simplified, and why: add-one (Laplace) smoothing instead of the reference's `+1e-6` and
zero-row-to-uniform rules (same ordering among observed experts, and a defined score before
anything is observed); the reference's encoder/decoder split of the topology term (for
Switch/NLLB) is dropped, every supported target being decoder-only; frequency counts routed
experts (what `record` is told), not cache accesses (`touch` also fires on prefetch admissions,
which would count predictions as activations).

Invariants: `victim(candidates)` returns one of `candidates` and never mutates state; `record`,
`set_layer` and `victim` may run on different threads (a lock guards the counters).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Iterable

from spmoe.types import ExpertKey


class PriorityPolicy:
    def __init__(self, moe_layers: Iterable[int], num_experts: int):
        self.moe_layers = list(moe_layers)
        if not self.moe_layers or num_experts < 1:
            raise ValueError(f"need >= 1 MoE layer and expert, got {self.moe_layers}, {num_experts}")
        self.num_experts = num_experts
        self._index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self._lock = threading.Lock()
        self._clock = 0
        self._last_use: dict[ExpertKey, int] = {}
        self._global: Counter[ExpertKey] = Counter()
        self._seq: Counter[ExpertKey] = Counter()
        self._seq_rows: Counter[int] = Counter()  # layer -> S(x)
        self.current = -1  # MoE-layer index being computed (-1: before the first layer)

    # -- what the predictor tells the policy -----------------------------------------------------

    def set_layer(self, layer: int) -> None:
        """Layer `layer` (a decoder-layer index) is being computed now."""
        with self._lock:
            self.current = self._index[layer]

    def record(self, layer: int, experts: Iterable[int]) -> None:
        """One forward routed `experts` at `layer`: +1 to their global and sequence counts."""
        with self._lock:
            for e in set(experts):
                key = (layer, e)
                self._global[key] += 1
                self._seq[key] += 1
                self._seq_rows[layer] += 1

    def new_sequence(self) -> None:
        with self._lock:
            self._seq.clear()
            self._seq_rows.clear()
            self.current = -1

    # -- the EvictionPolicy protocol -------------------------------------------------------------

    def touch(self, key: ExpertKey, demand: bool = True) -> None:
        with self._lock:
            self._clock += 1
            self._last_use[key] = self._clock

    def on_evict(self, key: ExpertKey) -> None:
        with self._lock:
            self._last_use.pop(key, None)

    def topo(self, layer: int) -> float:
        num_layers = len(self.moe_layers)
        d = (self._index[layer] - self.current - 1) % num_layers + 1
        return 1.0 - (d - 1) / num_layers

    def _factors(self, layer: int) -> tuple[float, int]:
        """(topo(layer), S(x) + E): a layer's part of every key's score."""
        return self.topo(layer), self._seq_rows.get(layer, 0) + self.num_experts

    def score(self, key: ExpertKey, factors: tuple[float, int] | None = None) -> float:
        topo, rows = factors or self._factors(key[0])
        seq = (self._seq.get(key, 0) + 1) / rows
        return topo * (self._global.get(key, 0) + 1) * seq

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        """The lowest (score, last touch), the first such in `candidates`: `score`'s arithmetic inlined
        over every layer's factors, computed once per call (a large cache ranks every evictable key on
        every admission)."""
        with self._lock:
            factors = {layer: self._factors(layer) for layer in self.moe_layers}
            glob, seq, last_use = self._global, self._seq, self._last_use
            best, best_key = None, None
            for key in candidates:
                topo, rows = factors[key[0]]
                rank = (topo * (glob.get(key, 0) + 1) * ((seq.get(key, 0) + 1) / rows), last_use.get(key, 0))
                if best is None or rank < best:
                    best, best_key = rank, key
            return best_key
