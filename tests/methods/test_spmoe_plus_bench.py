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
    perfect = hinted_accesses(trace, 8, perfect=True)  # the same accesses; each decode row's hints = its routes
    assert [(it[1], it[2]) for it in perfect if it[0] == "access"] == accesses
    routed = {}
    for it in perfect:
        if it[0] == "access" and it[2]:
            routed.setdefault(it[1][0], set()).add(it[1][1])
    hinted = {}
    for it in perfect:
        if it[0] == "hint":
            hinted.setdefault(it[2], set()).update(it[3])
    assert hinted == routed  # every hint names what its row routes, and every decode route was hinted


def test_table_reads_case_summaries(tmp_path, monkeypatch):
    import pandas as pd

    base = {"tpot_spread": 0.0, "num_generated_tokens": 4, "num_prompts": 1, "h2d_bytes_per_token": 2e9, "num_slots": 10,
            "expert_hit_rate": 0.5, "stall_ms": 30.0, "lossless": None, "peak_gpu_bytes": 2**30, "within_budget": True}
    cases = {"moe_infinity_nosd": ({"method": "moe_infinity_nosd", "tpot_ms_median": 200.0, "tpot_ms_rounds": [200.0]},
                                   [1, 2, 3, 4]),
             "spmoe_plus": ({"method": "spmoe_plus", "tpot_ms_median": 150.0, "tpot_ms_rounds": [150.0]}, [1, 2, 3, 4]),
             "plus_lossy_int4": ({"method": "spmoe_plus", "tpot_ms_median": 100.0, "tpot_ms_rounds": [100.0],
                                  "lossy_loads": 3, "lossy_load_bytes": 2e9, "host_ms_in_run": {"2": 7.5}},
                                 [1, 2, 9, 4])}
    for name, (summary, tokens) in cases.items():
        (tmp_path / "run" / name).mkdir(parents=True)
        (tmp_path / "run" / name / "summary.json").write_text(json.dumps({**base, **summary}))
        (tmp_path / "run" / name / "generations.jsonl").write_text(json.dumps({"token_ids": tokens}) + "\n")
    monkeypatch.setattr(sys, "argv", ["bench_plus", "--table", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    bench_plus.main()
    df = pd.read_csv(tmp_path / "out" / "table.csv").set_index("case")
    assert df.loc["plus_lossy_int4", "vs_best_other"] == 0.5 and df.loc["spmoe_plus", "vs_best_other"] == 0.75
    assert df.loc["plus_lossy_int4", "agree_plus"] == 0.75 and df.loc["plus_lossy_int4", "lossy_gb"] == 2
    assert df.loc["spmoe_plus", "gb_per_token"] == 2 and df.loc["spmoe_plus", "stall_ms_per_token"] == 10
    assert df.loc["plus_lossy_int4", "host_ms_in_run"] == "2:7.50"
