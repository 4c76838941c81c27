"""
sd_lookahead: eviction toward Belady under speculative prefetch (spmoe_plus's policy).

Belady evicts the resident key whose next use is farthest. Online, the next use is estimated as in
`expected_reuse` (`spmoe.offload.eviction`): E[next use] = d_k + n (1 / q_k - 1) layer visits, with
d_k = layers until k's layer comes back in the cyclic layer order and q_k k's smoothed routing
frequency, here over a discounted window: each visit of layer l multiplies its past counts by
`discount` (g), so q_k = (U_k + 1) / (V_l + 2) with U_k = sum over visits that used k of g^age and
V_l = sum over visits of g^age (g = 1 is expected_reuse's all-time frequency; g < 1 follows routing
that drifts with the text; results/spmoe_plus/eviction_sim compares them). What SP-MoE alone knows on top: while the draft runs, it names the experts the coming
verify step will route at each layer. A resident key predicted for its layer's next visit in this
step is used in exactly d_k visits (q = 1), so it is kept over anything not predicted; prefetched
keys are pinned by the provider anyway, and this keeps the predicted experts of layers past the
cutoff (not prefetched) as well.

Terms: a *prediction* (step s, layer l, experts) arrives as a `PrefetchRequest` through `observe`
(from any thread; its ids are read once its device->host copy has completed) or directly through
`predict`. Predictions of a newer step replace the older ones; a demand access at layer l consumes
layer l's prediction for the step (verification has passed it).
Invariants: `victim(candidates)` returns one of `candidates`; observing never blocks; with no
predictions and discount 1 the policy is `expected_reuse` exactly. `victim_by_layer` names `victim`'s
key from each layer's heap (non-predicted keys by discounted count, kept in logs: U_k g^-at_k orders a
layer's keys the same at every later visit), predicted keys only where a layer has no other candidate.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable

from spmoe.offload.eviction import ExpectedReusePolicy, register_policy
from spmoe.types import ExpertKey

NAME = "sd_lookahead"


class SdLookaheadPolicy(ExpectedReusePolicy):
    def __init__(self, moe_layers: Iterable[int], discount: float = 0.95):
        super().__init__(moe_layers)
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        self.discount = discount
        self._recent: dict[ExpertKey, tuple[float, int]] = {}  # key -> (U_k, V_l when U_k was last updated)
        self._step = -1
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for its next visit this step
        self._verified: set[int] = set()  # layers verification has passed since this step's predictions began
        self._pending: deque = deque()  # PrefetchRequests whose ids may still be in flight

    def observe(self, request) -> None:
        """A predictor's request (any thread); read lazily, never waited on."""
        self._pending.append(request)

    def predict(self, step: int, layer: int, expert_ids: Iterable[int]) -> None:
        if step > self._step:
            self._step = step
            self._predicted.clear()
            self._verified.clear()
        if step == self._step and layer not in self._verified:
            self._predicted.setdefault(layer, set()).update(int(e) for e in expert_ids)

    def _resolve(self) -> None:
        while self._pending:
            request = self._pending[0]
            if request.ready is not None and not request.ready.query():
                return  # later requests were recorded later on the same stream: not ready either
            self._pending.popleft()
            self.predict(request.step, request.layer, request.expert_ids.flatten().tolist())

    def _count_use(self, key: ExpertKey, demand: bool) -> bool:
        fresh = demand and key[0] in self._order
        if fresh:
            self._resolve()
            self._verified.add(key[0])
            self._predicted.pop(key[0], None)
        changed = super()._count_use(key, demand)
        if fresh:
            visits = self._visits[self._order[key[0]]]
            uses, at = self._recent.get(key, (0.0, 0))
            if at != visits:  # once per visit
                self._recent[key] = (uses * self.discount ** (visits - at) + 1, visits)
                changed = True
        return changed

    def _within_layer(self, key: ExpertKey) -> tuple:
        """Fewest discounted uses first (U_k g^-at_k, in logs: the same order at every later visit of the
        layer, since every key's count decays by the same g per visit), then oldest."""
        uses, at = self._recent.get(key, (0.0, 0))
        score = math.log(uses) - at * math.log(self.discount) if uses > 0 else -math.inf
        return score, self._last_visit.get(key, 0)

    def victim_by_layer(self, resident_by_layer, evictable) -> ExpertKey | None:
        self._resolve()
        return super().victim_by_layer(resident_by_layer, evictable)

    def _layer_best(self, layer: int, accept) -> tuple | None:
        """As `ExpectedReusePolicy._layer_best`, with predicted keys (next use d, the least a key of the layer
        can have) only when the layer has no other candidate, the oldest of them first."""
        predicted = self._predicted.get(layer, ())
        found = super()._layer_best(layer, lambda k: k[1] not in predicted and accept(k))
        if found is not None:
            return found
        keys = [(layer, e) for e in predicted if (layer, e) in self._heaps and accept((layer, e))]
        return max((self._ranked(k) for k in keys), default=None)

    def next_use(self, key: ExpertKey) -> float:
        n, i = len(self._order), self._order[key[0]]
        distance = (i - self._current - 1) % n
        if key[1] in self._predicted.get(key[0], ()):
            return distance
        g, visits = self.discount, self._visits[i]
        uses, at = self._recent.get(key, (0.0, 0))
        window = visits if g == 1 else (1 - g ** visits) / (1 - g)  # V_l
        q = (uses * g ** (visits - at) + 1) / (window + 2)
        return distance + n * (1 / q - 1)

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey:
        """`ExpectedReusePolicy.victim`'s rule with this policy's `next_use`, inlined the same way."""
        self._resolve()
        n, order, cur, g = len(self._order), self._order, self._current, self.discount
        dist = [(i - cur - 1) % n for i in range(n)]
        visits = self._visits
        den = [(v if g == 1 else (1 - g ** v) / (1 - g)) + 2 for v in visits]  # window V_l + 2
        predicted, recent, last = self._predicted, self._recent, self._last_visit
        best, best_key = None, None
        for k in candidates:
            i = order[k[0]]
            if k[1] in predicted.get(k[0], ()):
                use = dist[i]
            else:
                uses, at = recent.get(k, (0.0, 0))
                use = dist[i] + n * (1 / ((uses * g ** (visits[i] - at) + 1) / den[i]) - 1)
            rank = (use, -last.get(k, 0))
            if best is None or rank > best:
                best, best_key = rank, k
        return best_key

    def needed_before(self, resident: ExpertKey, incoming: ExpertKey) -> bool:
        self._resolve()
        return super().needed_before(resident, incoming)


class PredictionSink:
    """A `provider` for a `DraftRouterPredictor` that only informs the policy (no prefetch): the
    predictions of layers past the cutoff."""

    def __init__(self, policy: SdLookaheadPolicy):
        self.policy = policy

    def submit(self, request) -> None:
        self.policy.observe(request)


register_policy(NAME, SdLookaheadPolicy, layer_aware=True)
