"""The host-work bench scripts run end to end on the CPU (tiny model, a few tokens) and write their
tables: they import each other's helpers, so a changed signature must fail here, not on the GPU."""

from __future__ import annotations

import sys

import pytest

from experiments import bench_host_overhead, bench_layer_grouped


@pytest.mark.parametrize("script, extra", [
    (bench_layer_grouped, ["--model", "tiny_deepseek_v2", "--dataset", "synthetic", "--card", "cpu",
                           "--methods", "lru_nosd", "--cases", "graphed", "loop"]),
    (bench_host_overhead, ["--methods", "lru_nosd"]),
])
def test_bench_script_runs_and_writes_its_table(script, extra, tmp_path, monkeypatch):
    argv = [script.__name__, "--hardware", "cpu", "--num-slots", "6", "--tokens", "3", "--rounds", "1",
            "--out", str(tmp_path), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    assert (tmp_path / "table.md").read_text().count("lru_nosd") >= 1
