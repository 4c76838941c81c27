"""
Host gate: whether a step may compute experts on the host at all (`method.plus.host_compute=auto`), judged
from the run's own decode steps. The planner (`spmoe.plus.host_experts.HostPlanner`) prices each host
expert against the copies it replaces, not what the host path costs beyond that: the layer leaves its
call-site CUDA graph, the host threads compete with the decode thread for the cores, and a host expert is
not loaded, so it misses again at its next use.

Terms: a decode step's *missing experts* m = its layer forwards' misses plus their host-computed experts
(the provider's `ExpertEventLog` entries of the step, read at `end_step` before the engine drains them); its
time t = wall ms from `begin_step` to `end_step`; a *host step* computed at least one expert on the host, a
*link step* none.
Model: t = c + b m. Over the last WINDOW_STEPS decode steps: c and b_link by least squares on the link steps;
b_host = the mean over host steps of (t - c) / m (a host step has m >= 1), the step time each missing
expert costs when the host takes part.
Cold experts: a host-computed expert is not loaded, so its next use may miss again, in a later step of either
kind, where no per-step fit can see it. The gate follows every host-computed key until it is next needed: a
*repeat* if it then misses (hit, prefetched or host again: no repeat). p = repeats / host experts, r = the decode
steps' hit rate (needed experts found resident, over those and the misses; the prefill's cold misses would drown
it); a repeat would have been a hit with probability about r had the expert been loaded, so each host expert
costs cold = p r b_link more, and the host is judged by b_host + cold.
Decisions, at each step's start (`HostPlanner.allowed`):
- the prefill (step 0) runs on the link only: it touches most experts, and the ones it would compute on the
  host would stay cold and miss in the first decode steps, which TPOT counts and the prefill's gain does not;
- a decode step may use the host unless both kinds have `min_steps` samples, the link steps' m varies (else
  c and b_link are not separable) and b_host + cold > b_link; a gated-off run still allows the host every
  `probe_every`-th decode step, so b_host follows the run.
Memory: what the gate has learned (`GateHistory`: the window of samples and the repeat and hit counts) may outlive
one run: a session hands each run of one method configuration the same history (`MethodContext.memory`), as a
long-running engine keeps its gate, so a later run judges from its first decode step; `host_gate_carried_samples`
in the summary says how many samples a run started with. The cold keys being followed stay per run.
Units: milliseconds. Invariant: the gate only switches the planner off; what a step computes is the same
function either way (host experts are exact, see `spmoe.plus.host_experts`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from spmoe.plus.host_experts import HostPlanner
from spmoe.trace.records import ExpertEventLog, LayerEvents

WINDOW_STEPS = 64


@dataclass
class GateHistory:
    """What a gate has learned, which may outlive one run (module docstring)."""

    samples: deque = field(default_factory=lambda: deque(maxlen=WINDOW_STEPS))  # (host step, m, t ms)
    num_host: int = 0  # host experts
    num_repeats: int = 0  # their repeat misses
    num_resident: int = 0  # needed experts found resident (decode steps)
    num_misses: int = 0  # needed experts missed (decode steps)


class HostGate:
    def __init__(self, planner: HostPlanner, events: ExpertEventLog, history: GateHistory | None = None,
                 min_steps: int = 4, probe_every: int = 8, clock=time.perf_counter):
        self.planner, self.events, self.clock = planner, events, clock
        self.min_steps, self.probe_every = min_steps, probe_every
        self.history = history if history is not None else GateHistory()
        self.carried_samples = len(self.history.samples)
        self.steps_off = 0  # decode steps run with the host gated off
        self._step = 0
        self._decode_steps = 0
        self._t0 = 0.0
        self._cold: set[tuple[int, int]] = set()  # host-computed keys not needed since

    def fit(self) -> tuple[float, float, float] | None:
        """(c, b_link, b_host) from the window, or None where the model cannot separate them yet."""
        link = [(m, t) for host, m, t in self.history.samples if not host]
        host = [(m, t) for h, m, t in self.history.samples if h]
        if len(link) < self.min_steps or len(host) < self.min_steps:
            return None
        n = len(link)
        mean_m, mean_t = sum(m for m, _ in link) / n, sum(t for _, t in link) / n
        var = sum((m - mean_m) ** 2 for m, _ in link)
        if var <= 0:
            return None
        b_link = sum((m - mean_m) * (t - mean_t) for m, t in link) / var
        c = mean_t - b_link * mean_m
        b_host = sum((t - c) / m for m, t in host) / len(host)
        return c, b_link, b_host

    def cold_ms(self, b_link: float) -> float:
        """What each host expert costs later steps through its repeat misses: p r b_link (module docstring)."""
        h = self.history
        needed = h.num_resident + h.num_misses
        if not h.num_host or not needed:
            return 0.0
        return h.num_repeats / h.num_host * h.num_resident / needed * b_link

    def allowed(self) -> bool:
        """Whether the next decode step may use the host."""
        fitted = self.fit()
        if fitted is None or fitted[2] + self.cold_ms(fitted[1]) <= fitted[1]:
            return True
        return self.probe_every > 0 and self._decode_steps % self.probe_every == 0

    # -- the engine seam -------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self._step = step
        self.planner.allowed = False  # the prefill: link only (module docstring)
        if step > 0:
            self._decode_steps += 1
            self.planner.allowed = self.allowed()
            self.steps_off += not self.planner.allowed
        self._t0 = self.clock()

    def end_step(self) -> None:
        if self._step == 0:
            return
        layers = [ev for ev in self.events.pending() if isinstance(ev, LayerEvents)]
        for ev in layers:
            self._follow_cold(ev)
        missing = sum(len(ev.misses) + len(ev.host) for ev in layers)
        self.history.samples.append((any(ev.host for ev in layers), missing, (self.clock() - self._t0) * 1e3))

    def _follow_cold(self, ev: LayerEvents) -> None:
        h, resident = self.history, (*ev.hits, *ev.prefetch_hits, *ev.late)
        h.num_resident += len(resident)
        h.num_misses += len(ev.misses)
        h.num_repeats += sum((ev.layer, e) in self._cold for e in ev.misses)
        self._cold.difference_update((ev.layer, e) for e in (*resident, *ev.misses))
        self._cold.update((ev.layer, e) for e in ev.host)
        h.num_host += len(ev.host)

    def summary(self) -> dict:
        fitted = self.fit()
        return {"host_gate_steps_off": self.steps_off, "host_gate_decode_steps": self._decode_steps,
                "host_gate_b_link_ms": fitted[1] if fitted else None,
                "host_gate_b_host_ms": fitted[2] if fitted else None,
                "host_gate_cold_ms": self.cold_ms(fitted[1]) if fitted else None,
                "host_gate_repeat_rate": (self.history.num_repeats / self.history.num_host
                                          if self.history.num_host else None),
                "host_gate_carried_samples": self.carried_samples}
