"""analysis.dashboard: the W&B workspace view is built offline (no socket opened) and charts what log_run logs."""

from __future__ import annotations

import json
import socket

import pytest

from analysis import dashboard
from spmoe.tracking import STEP_COLUMNS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # wandb-workspaces uses pydantic v1 validators


def test_workspace_builds_offline_with_every_section(monkeypatch, capsys):
    pytest.importorskip("wandb_workspaces")

    def refuse(self, address):
        raise OSError(f"no network in this test ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    dashboard.main(["--entity", "someone", "--project", "spmoe-test"])
    spec = json.loads(capsys.readouterr().out)
    assert (spec["entity"], spec["project"], spec["displayName"]) == ("someone", "spmoe-test", "SP-MoE runs")
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == list(dashboard.SECTIONS)
    lines = [p["config"] for s in sections for p in s["panels"] if p["viewType"] == "Run History Line Plot"]
    assert lines and all(c["xAxis"] == "emitted_tokens" for c in lines)
    charted = {m for c in lines for m in c["metrics"]}
    assert charted == {f"step/{n}" for n in STEP_COLUMNS.values()} - {"step/emitted", "step/prefetches_issued"}
    bars = [p["config"] for s in sections for p in s["panels"] if p["viewType"] == "Run Comparer"
            or "Bar" in p["viewType"]]
    assert any("tpot_ms" in c.get("metrics", []) for c in bars)
