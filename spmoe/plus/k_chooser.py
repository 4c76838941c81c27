"""
Union-aware adaptive draft length: the k of each step, from expected emitted tokens over expected
step time (`Runtime.choose_k`, see `spmoe.engine.StepState`).

Model, for k in [k_min, max_k]:
  E[emitted](k)  = sum_{i=0..k} a^i                      (a = acceptance per draft token)
  T(k)           = k d + c + b L u(k+1) m
where d = draft ms per draft token, L = MoE layers, u(T) = distinct experts one layer forward of T
tokens needs (the union of the verify positions), m = the fraction of them not resident when
verification reaches the layer (after prefetch), so L u m = missing experts per step, and
verify ms = c + b x (missing experts) is fitted by least squares over the run's steps (c: what
verification costs without misses, b: the exposed ms per missing expert, clamped to [0, miss_ms];
until two distinct miss counts are seen, b = miss_ms and c the mean of verify ms - b x).
Decision: k* = argmax E[emitted] / T, ties to the smaller k, where T(k) is the measured mean step
time of k once k has run `min_samples` steps, else the model's T(k) scaled by the measured / model
ratio of the k values measured so far (so an untried k is judged by the model's shape, calibrated).
Estimates are exponential moving averages (weight `ema`; `accept_ema` for a) of the run's own
steps: a from accepted drafts (successes) over accepted + rejected drafts (trials), d from the
drafting wall time, u(T) per T seen, m per layer forward. u(T) for a T not yet seen scales the
independent-routing union E (1 - (1 - A / E)^T) (E experts, A per token) by the measured /
independent ratio at the nearest T seen (u and E[emitted]: `spmoe.plus.step_model`, shared with the
draft choice). Priors: a = accept_prior, d = 0, m = 1.
Start and exploration: the first `warmup_steps` decode steps of a prompt draft max_k (acceptance is
only measured by drafting); every `explore_every` steps the least-measured k is run once.
Units: milliseconds.
"""

from __future__ import annotations

import time

from spmoe.engine import StepState
from spmoe.plus.step_model import expected_emitted, union_size


class KChooser:
    def __init__(self, k_min: int, num_layers: int, num_experts: int, top_k: int, miss_ms: float,
                 accept_prior: float, ema: float = 0.2, accept_ema: float = 0.1, warmup_steps: int = 2,
                 explore_every: int = 16, min_samples: int = 2, clock=time.perf_counter):
        if not 0 <= accept_prior <= 1:
            raise ValueError(f"accept_prior must be in [0, 1], got {accept_prior}")
        self.k_min, self.num_layers, self.num_experts, self.top_k = k_min, num_layers, num_experts, top_k
        self.miss_ms, self.ema, self.accept_ema = miss_ms, ema, accept_ema
        self.warmup_steps, self.explore_every, self.min_samples, self.clock = (warmup_steps, explore_every,
                                                                               min_samples, clock)
        self.successes, self.trials = accept_prior, 1.0  # EMA numerator / denominator of a
        self.draft_ms = 0.0  # d
        self.missing_frac = 1.0  # m
        self.union: dict[int, float] = {}  # T -> u(T)
        self.step_ms: dict[int, float] = {}  # k -> measured mean step ms (EMA)
        self.samples: dict[int, int] = {}  # k -> steps measured
        self._fit = [0.0] * 5  # EMA sums of 1, x, y, xx, xy for verify ms = c + b x
        self.chosen: list[int] = []  # k of every step chosen, in order
        self._last: tuple[int, int] | None = None  # (pos, k) of the previous decode step
        self._prompt_steps = 0
        self._step = 0
        self._t0 = self._t_verify = None
        self._missing_step = 0

    # -- the model -------------------------------------------------------------------------------

    @property
    def acceptance(self) -> float:
        return self.successes / self.trials

    def verify_fit(self) -> tuple[float, float]:
        """(c, b) of verify ms = c + b x missing experts; the prior (0, miss_ms) until x varies."""
        n, sx, sy, sxx, sxy = self._fit
        if n <= 0:
            return 0.0, self.miss_ms
        var = n * sxx - sx * sx
        b = self.miss_ms if var <= 1e-9 * max(1.0, n * sxx) else min(max((n * sxy - sx * sy) / var, 0.0), self.miss_ms)
        return max(0.0, (sy - b * sx) / n), b

    def union_size(self, num_tokens: int) -> float:
        def independent(t: int) -> float:
            return union_size(self.num_experts, self.top_k, t)

        if num_tokens in self.union:
            return self.union[num_tokens]
        if not self.union:
            return independent(num_tokens)
        nearest = min(self.union, key=lambda t: (abs(t - num_tokens), t))
        return min(self.num_experts, independent(num_tokens) * self.union[nearest] / independent(nearest))

    def expected_emitted(self, k: int) -> float:
        return expected_emitted(self.acceptance, k)

    def model_step_ms(self, k: int) -> float:
        c, b = self.verify_fit()
        return k * self.draft_ms + c + b * self.num_layers * self.union_size(k + 1) * self.missing_frac

    def expected_step_ms(self, k: int) -> float:
        measured = [j for j, n in self.samples.items() if n >= self.min_samples]
        if k in measured:
            return self.step_ms[k]
        if not measured:
            return self.model_step_ms(k)
        scale = sum(self.step_ms[j] for j in measured) / max(1e-9, sum(self.model_step_ms(j) for j in measured))
        return scale * self.model_step_ms(k)

    def best_k(self, max_k: int) -> int:
        lo = min(self.k_min, max_k)
        return max(range(lo, max_k + 1),
                   key=lambda k: (self.expected_emitted(k) / max(self.expected_step_ms(k), 1e-9), -k))

    # -- the engine seam and observations --------------------------------------------------------

    def __call__(self, state: StepState) -> int:
        if self._last is not None and state.pos > self._last[0] and self._last[1] > 0:  # the previous step's outcome
            prev_pos, prev_k = self._last
            accepted = state.pos - prev_pos - 1
            self._update("successes", accepted, self.accept_ema)
            self._update("trials", accepted + (accepted < prev_k), self.accept_ema)
        lo = min(self.k_min, state.max_k)
        if self._prompt_steps < self.warmup_steps:
            k = state.max_k
        elif self.explore_every and len(self.chosen) % self.explore_every == self.explore_every - 1:
            k = min(range(lo, state.max_k + 1), key=lambda j: (self.samples.get(j, 0), j))
        else:
            k = self.best_k(state.max_k)
        self._prompt_steps += 1
        self._last = (state.pos, k)
        self.chosen.append(k)
        return k

    def _update(self, name: str, value: float, rate: float) -> None:
        setattr(self, name, (1 - rate) * getattr(self, name) + rate * value)

    def on_layer(self, layer: int, num_tokens: int, num_unique: int, num_missing: int) -> None:
        """One target MoE layer forward: its union and how much of it was missing."""
        if self._step == 0 or num_unique == 0:
            return
        if self._t_verify is None:
            self._t_verify = self.clock()
        prev = self.union.get(num_tokens)
        self.union[num_tokens] = num_unique if prev is None else (1 - self.ema) * prev + self.ema * num_unique
        self._update("missing_frac", num_missing / num_unique, self.ema / self.num_layers)
        self._missing_step += num_missing

    def observe_verify(self, missing: int, verify_ms: float) -> None:
        """One verification: its missing experts and wall time, a point of the c + b x fit."""
        x, y = float(missing), verify_ms
        self._fit = [(1 - self.ema) * s + self.ema * v for s, v in zip(self._fit, (1.0, x, y, x * x, x * y))]

    def begin_step(self, step: int) -> None:
        self._step, self._t0, self._t_verify, self._missing_step = step, self.clock(), None, 0
        if step == 0:
            self._last, self._prompt_steps = None, 0  # a new prompt

    def end_step(self) -> None:
        if self._step == 0 or self._t_verify is None or self._last is None:
            return
        k = self._last[1]
        now = self.clock()
        if k > 0:
            self._update("draft_ms", (self._t_verify - self._t0) * 1e3 / k, self.ema)
        self.observe_verify(self._missing_step, (now - self._t_verify) * 1e3)
        ms = (now - self._t0) * 1e3
        self.step_ms[k] = ms if k not in self.step_ms else (1 - self.ema) * self.step_ms[k] + self.ema * ms
        self.samples[k] = self.samples.get(k, 0) + 1
