"""experiments/bench_plus on the tiny CPU model: the host expert profile, and the offline eviction
simulation (the same demand accesses as experiments.eviction_sim)."""

from __future__ import annotations

import json
import sys


from experiments import bench_plus
from experiments.eviction_sim import demand_accesses
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
    items = bench_plus.hinted_accesses(trace, 8)
    accesses = [(it[1], it[2]) for it in items if it[0] == "access"]
    assert accesses == demand_accesses(trace, 8, speculative=True)
    assert any(it[0] == "hint" for it in items)
    oracle = belady_misses(accesses, 12)
    for policy in ("layer_distance", "sd_lookahead"):
        assert bench_plus.simulate(items, 12, policy, 8) >= oracle
