"""
A wall-clock allowance for one experiment job (`experiment.time_limit_s`), so a job on a machine lent
in short calls ends with summaries instead of being killed with none.

Terms: the *allowance* runs from the job's start (`TimeLimit.start`, before the model is built); a
*stage* is one more round of every case, one case's run within a round, or one more case's lossless
check.
Invariants: a stage is started only if the slowest stage of its kind so far, run again, would end
within the allowance less `reserve_s` (time promised to later stages, e.g. the lossless checks that
cases already run are owed); the first of a kind always runs: nothing predicts it. A job without a
limit never skips anything. The caller asks before each stage (`allows`) and records what it skipped
in the summaries.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class TimeLimit:
    def __init__(self, limit_s: float | None):
        if limit_s is not None and limit_s <= 0:
            raise ValueError(f"experiment.time_limit_s must be > 0 (or null: no limit), got {limit_s}")
        self.limit_s = limit_s
        self.start = time.perf_counter()
        self._slowest_s: dict[str, float] = {}

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, kind: str, reserve_s: float = 0.0) -> bool:
        """Whether another stage of `kind` fits, judged by the slowest one so far, with `reserve_s` kept
        for later stages."""
        if self.limit_s is None or kind not in self._slowest_s:
            return True
        return self.elapsed_s() + self._slowest_s[kind] + reserve_s <= self.limit_s

    def slowest_s(self, kind: str) -> float:
        """The slowest stage of `kind` so far (0 before the first)."""
        return self._slowest_s.get(kind, 0.0)

    @contextmanager
    def timed(self, kind: str):
        """Context manager that records how long one stage of `kind` took."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - t0
            self._slowest_s[kind] = max(took, self._slowest_s.get(kind, 0.0))
