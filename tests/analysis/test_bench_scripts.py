"""The GPU benchmark scripts end to end on the tiny CPU model: files, columns, and their arithmetic."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from spmoe.trace.oracle import runtime_efficiency
from experiments import bench_offload

TINY = ["--model", "tiny", "--draft", "tiny", "--device", "cpu", "--max-new-tokens", "6"]


def _main(module, monkeypatch, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", [module.__name__, *args])
    module.main()


def test_bench_offload_paced_tables_and_repeated_reference(tmp_path, monkeypatch):
    _main(bench_offload, monkeypatch, TINY + ["--budgets", "rtx4090", "--num-slots", "6", "--pace-pcie",
                                              "--cases", "lru,spmoe,spmoe_er", "--repeat-reference",
                                              "--out", str(tmp_path)])
    out = tmp_path / "rtx4090"
    main = pd.read_csv(out / "main.csv").set_index("case")
    runs = json.loads((out / "runs.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    assert list(main.index) == ["gpu_resident", "gpu_resident_sd", "lru", "spmoe", "spmoe_er"]
    assert runs["spmoe_er"]["eviction"] == "expected_reuse" and runs["spmoe"]["eviction"] == "layer_distance"
    assert meta["pcie_paced_gb_per_s"] == 25.0 and all(runs[c]["pcie_paced_gb_per_s"] == 25.0 for c in ("lru", "spmoe"))
    # runtime efficiency is taken against the paced link, with the same-process SD reference as compute
    s = runs["lru"]
    expected = runtime_efficiency(s["tpot_ms"], s["h2d_bytes_per_token"], 25.0, runs["gpu_resident_sd"]["tpot_ms"])
    assert main.loc["lru", "runtime_eff"] == pytest.approx(expected, rel=1e-3)
    again = json.loads((tmp_path / "reference_end.json").read_text())
    assert set(again) == {"gpu_resident", "gpu_resident_sd"}
    assert again["gpu_resident"]["first_tpot_ms"] == pytest.approx(runs["gpu_resident"]["tpot_ms"])
    assert not list(tmp_path.rglob("partial_runs.json"))  # finished: no partial file left behind
