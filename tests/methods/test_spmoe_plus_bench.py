"""experiments/bench_plus's host expert profile on the tiny CPU model, and experiments.eviction_sim's
hinted access sequence (the same demand accesses plus the draft's predictions)."""

from __future__ import annotations

import json
import sys


from experiments import bench_plus
from experiments.eviction_sim import demand_accesses, hinted_accesses, policy_misses
from spmoe.trace.oracle import belady_misses
from spmoe.trace.routing import load_trace

TRACE = "results/real_pair/traces/humaneval_k1.npz"


def test_host_profile_times_host_experts(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_plus", "--host", "--model", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    bench_plus.main()
    host = json.loads((tmp_path / "host.json").read_text())
    assert all(host[f"host_ms_per_expert_{n}tok"] > 0 for n in (1, 2, 4))


def test_eviction_sim_sees_the_same_accesses_plus_hints():
    trace = load_trace(TRACE)
    items = hinted_accesses(trace, 8)
    accesses = [(it[1], it[2]) for it in items if it[0] == "access"]
    assert accesses == demand_accesses(trace, 8, speculative=True)
    assert any(it[0] == "hint" for it in items)
    oracle = belady_misses(accesses, 12)
    for policy in ("layer_distance", "sd_lookahead"):
        assert policy_misses(items, 12, policy, 8) >= oracle
