"""
Union-aware adaptive draft length: the k of each step, from expected emitted tokens over expected
step time (`Runtime.choose_k`, see `spmoe.engine.StepState`).

Model, for k in [k_min, max_k]:
  E[emitted](k)  = sum_{i=0..k} a^i                      (a = acceptance per draft token)
  E[step ms](k)  = k d + c + L u(k+1) m t_miss
where d = draft ms per draft token, c = verify ms not spent on missing experts, L = MoE layers,
u(T) = distinct experts one layer forward of T tokens needs (the union of the verify positions),
m = the fraction of them not resident when verification reaches the layer (after prefetch), and
t_miss = ms per missing expert (the link's copy time, or the host's when host compute is cheaper).
k* = argmax E[emitted] / E[step ms]; ties go to the smaller k.
Estimates are exponential moving averages (weight `ema`; `accept_ema` for a, slower, so that one
rejection does not stop drafting) of the run's own steps: a from accepted drafts (successes) over
accepted + rejected drafts (trials), d and c from the step's wall times,
u(T) per T seen, m per layer forward. u(T) for a T not yet seen scales the independent-routing
union E (1 - (1 - A / E)^T) (E experts, A per token) by the measured / independent ratio at the
nearest T seen. Priors: a = accept_prior, d = c = 0, m = 1.
Exploration: after `explore_after` steps in a row without drafting, one step drafts
max(1, k_min), so acceptance keeps being measured.
Units: milliseconds.
"""

from __future__ import annotations

import time

from spmoe.engine import StepState


class KChooser:
    def __init__(self, k_min: int, num_layers: int, num_experts: int, top_k: int, miss_ms: float,
                 accept_prior: float, ema: float = 0.2, accept_ema: float = 0.05, explore_after: int = 8):
        if not 0 <= accept_prior <= 1:
            raise ValueError(f"accept_prior must be in [0, 1], got {accept_prior}")
        self.k_min, self.num_layers, self.num_experts, self.top_k = k_min, num_layers, num_experts, top_k
        self.miss_ms, self.ema, self.accept_ema, self.explore_after = miss_ms, ema, accept_ema, explore_after
        self.successes, self.trials = accept_prior, 1.0  # EMA numerator / denominator of a
        self.draft_ms = 0.0  # d
        self.verify_fixed_ms = 0.0  # c
        self.missing_frac = 1.0  # m
        self.union: dict[int, float] = {}  # T -> u(T)
        self.chosen: list[int] = []  # k of every step chosen, in order
        self._last: tuple[int, int] | None = None  # (pos, k) of the previous decode step
        self._no_draft = 0
        self._step = 0
        self._t0 = self._t_verify = None
        self._missing_step = 0

    # -- the model -------------------------------------------------------------------------------

    @property
    def acceptance(self) -> float:
        return self.successes / self.trials

    def union_size(self, num_tokens: int) -> float:
        def independent(t: int) -> float:
            return self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** t)

        if num_tokens in self.union:
            return self.union[num_tokens]
        if not self.union:
            return independent(num_tokens)
        nearest = min(self.union, key=lambda t: (abs(t - num_tokens), t))
        return min(self.num_experts, independent(num_tokens) * self.union[nearest] / independent(nearest))

    def expected_emitted(self, k: int) -> float:
        a = self.acceptance
        return sum(a ** i for i in range(k + 1))

    def expected_step_ms(self, k: int) -> float:
        misses = self.num_layers * self.union_size(k + 1) * self.missing_frac
        return k * self.draft_ms + self.verify_fixed_ms + misses * self.miss_ms

    def best_k(self, max_k: int) -> int:
        lo = min(self.k_min, max_k)
        return max(range(lo, max_k + 1), key=lambda k: (self.expected_emitted(k) / max(self.expected_step_ms(k), 1e-9), -k))

    # -- the engine seam and observations --------------------------------------------------------

    def __call__(self, state: StepState) -> int:
        if self._last is not None and state.pos > self._last[0] and self._last[1] > 0:  # the previous step's outcome
            prev_pos, prev_k = self._last
            accepted = state.pos - prev_pos - 1
            self._update("successes", accepted, rate=self.accept_ema)
            self._update("trials", accepted + (accepted < prev_k), rate=self.accept_ema)
        k = self.best_k(state.max_k)
        if k == 0 and self._no_draft >= self.explore_after:
            k = min(max(1, self.k_min), state.max_k)
        self._no_draft = self._no_draft + 1 if k == 0 else 0
        self._last = (state.pos, k)
        self.chosen.append(k)
        return k

    def _update(self, name: str, value: float, rate: float | None) -> None:
        w = self.ema if rate is None else rate
        setattr(self, name, (1 - w) * getattr(self, name) + w * value)

    def on_layer(self, layer: int, num_tokens: int, num_unique: int, num_missing: int) -> None:
        """One target MoE layer forward: its union and how much of it was missing."""
        if self._step == 0 or num_unique == 0:
            return
        if self._t_verify is None:
            self._t_verify = time.perf_counter()
        prev = self.union.get(num_tokens)
        self.union[num_tokens] = num_unique if prev is None else (1 - self.ema) * prev + self.ema * num_unique
        self._update("missing_frac", num_missing / num_unique, rate=self.ema / self.num_layers)
        self._missing_step += num_missing

    def begin_step(self, step: int) -> None:
        self._step, self._t0, self._t_verify, self._missing_step = step, time.perf_counter(), None, 0
        if step == 0:
            self._last = None  # a new prompt

    def end_step(self) -> None:
        if self._step == 0 or self._t_verify is None:
            return
        k = self._last[1] if self._last else 0
        if k > 0:
            self._update("draft_ms", (self._t_verify - self._t0) * 1e3 / k, rate=None)
        verify_ms = (time.perf_counter() - self._t_verify) * 1e3
        self._update("verify_fixed_ms", max(0.0, verify_ms - self._missing_step * self.miss_ms), rate=None)
