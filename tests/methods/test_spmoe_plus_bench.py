"""experiments/bench_plus end to end on the tiny CPU model (interleaved rounds, table arithmetic) and
its offline eviction simulation (the same demand accesses as experiments.eviction_sim)."""

from __future__ import annotations

import json
import statistics
import sys

import pandas as pd
import pytest

from experiments import bench_plus
from experiments.eviction_sim import demand_accesses
from spmoe.trace.oracle import belady_misses
from spmoe.trace.routing import load_trace

TRACE = "results/real_pair/traces/humaneval_k1.npz"


def test_bench_plus_rounds_and_table(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "bench_plus", "--model", "tiny", "--draft", "tiny", "--device", "cpu", "--routing", "replay",
        "--trace", TRACE, "--budgets", "cpu", "--num-slots", "10", "--max-new-tokens", "6", "--rounds", "2",
        "--cases", "lru_nosd,spmoe,spmoe_plus,plus_nohost", "--out", str(tmp_path)])
    bench_plus.main()
    main = pd.read_csv(tmp_path / "cpu" / "main.csv").set_index("case")
    runs = json.loads((tmp_path / "cpu" / "runs.json").read_text())
    assert list(main.index) == ["lru_nosd", "spmoe", "spmoe_plus", "plus_nohost"]
    assert [[s["round"] for s in runs[c]] for c in main.index] == [[0, 1]] * 4
    for case in main.index:
        assert main.loc[case, "tpot_ms"] == pytest.approx(statistics.median(s["tpot_ms"] for s in runs[case]), rel=1e-3)
    best = min(main.loc[["lru_nosd", "spmoe"], "tpot_ms"])
    assert main.loc["spmoe_plus", "vs_best_baseline"] == pytest.approx(main.loc["spmoe_plus", "tpot_ms"] / best, rel=1e-3)
    assert runs["plus_nohost"][0]["host_experts"] == 0 and runs["spmoe_plus"][0]["draft_precision"] == "int8"
    assert not list(tmp_path.rglob("partial_runs.json"))


def test_eviction_sim_sees_the_same_accesses_plus_hints():
    trace = load_trace(TRACE)
    items = bench_plus.hinted_accesses(trace, 8)
    accesses = [(it[1], it[2]) for it in items if it[0] == "access"]
    assert accesses == demand_accesses(trace, 8, speculative=True)
    assert any(it[0] == "hint" for it in items)
    oracle = belady_misses(accesses, 12)
    for policy in ("layer_distance", "sd_lookahead"):
        assert bench_plus.simulate(items, 12, policy, 8) >= oracle
