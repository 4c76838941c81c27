"""spmoe.tracking: a finished run dir logged as an offline W&B run (history per decode step against emitted
tokens, per-layer and breakdown tables, summary, identity from the Hydra files, the run files as an
artifact) and read back from wandb's offline `.wandb` file; `logger=wandb` through run.py; config errors.

Every wandb test runs with WANDB_MODE=offline, no API key and WANDB_BASE_URL pointing at a closed local
port, so a stray attempt to go online fails fast instead of reaching W&B. One run.py subprocess and one
in-process tiny spmoe run (~15 s together on a 2-core CPU box); the rest takes a few seconds.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest

from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.config import LoggerConfig
from spmoe.tracking import NullTracker, STEP_COLUMNS, log_run, make_tracker, run_identity
from test_run import run_py

NO_SERVER_URL = "http://127.0.0.1:9"  # the discard port: nothing listens, so going online fails at once


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """wandb, offline and silent, with nothing to log in with; torn down after the test."""
    wandb = pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_BASE_URL", NO_SERVER_URL)
    yield wandb
    wandb.teardown()  # stop this process's wandb-core service, forget its settings


@pytest.fixture
def no_remote_connections(monkeypatch):
    """Records (and refuses) every socket connection this process makes to a non-loopback address."""
    attempts = []
    connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test_tracker: no network ({address})")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run's `run-<id>.wandb` file.

    The file is W&B's LevelDB-style log: a 7-byte header (b":W&B", magic, version), then 32 KiB blocks of
    chunks, each [crc32: 4][length: 2, little endian][type: 1][data]; type 1 = a whole record,
    2/3/4 = its first/middle/last part; a block tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def offline_records(wandb_dir: Path) -> list:
    runs = sorted(wandb_dir.glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in wandb_dir.iterdir())
    return wandb_records(next(runs[0].glob("run-*.wandb")))


def history_rows(records: list) -> list[dict]:
    """Each `run.log` call's items as {key: value} (wandb's own `_step`, `_runtime`, `_timestamp` left out)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item
                         if not (i.key or i.nested_key[0]).startswith("_")})
    return rows


def offline_run(wandb_dir: Path) -> tuple[Path, dict, dict, list]:
    """(the offline run dir, its summary, its config, its run records), from the .wandb file."""
    runs = sorted(wandb_dir.glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in wandb_dir.iterdir())
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    summary, config = {}, {}  # top-level items; wandb's own (`_wandb`, `_runtime`) left out
    for r in records:
        updates = {"summary": r.summary.update, "config": r.config.update, "run": r.run.config.update}
        kind = r.WhichOneof("record_type")
        items = {item.key: json.loads(item.value_json) for item in updates.get(kind, [])
                 if item.key and not item.key.startswith("_")}
        (summary if kind == "summary" else config).update(items)
    return runs[0], summary, config, [r.run for r in records if r.HasField("run")]


# ------------------------------------------------------------------------------------------------
# with wandb

def test_run_py_logs_an_offline_wandb_run(wandb_offline, tmp_path):
    run_dir = tmp_path / "out"
    proc = run_py("logger=wandb", "num_prompts=1", "max_new_tokens=4", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = json.loads((run_dir / "summary.json").read_text())

    wandb_dir = run_dir / "wandb"  # wandb.init(dir=<run dir>), not WANDB_DIR or the cwd
    offline_dir, summary, config, runs = offline_run(wandb_dir)
    assert not list(wandb_dir.glob("run-*")), "an online run dir was created"
    method = written["method"]
    assert summary["method"] == method and summary["tpot_ms"] == written["tpot_ms"] > 0
    assert config["method"]["name"] == method and config["model"]["name"] == "tiny"
    assert config["logger"] == {"name": "wandb", "project": "spmoe", "mode": "offline"}
    assert [(r.project, r.job_type) for r in runs] == [("spmoe", method)]
    # nothing went online or logged in
    logs = "".join(p.read_text(errors="replace") for p in wandb_dir.rglob("*.log"))
    assert not re.search(r"127\.0\.0\.1:9\b", logs), "something tried WANDB_BASE_URL"
    assert not (Path.home() / ".netrc").exists()
    assert (offline_dir / "files").is_dir()


@pytest.fixture(scope="module")
def spmoe_run_dir(tmp_path_factory):
    """A finished tiny spmoe run (SD, prefetching) as a multirun job: <sweep>/<job>/ with .hydra files."""
    from spmoe.experiment import run_benchmark

    sweep = tmp_path_factory.mktemp("sweep_cutoff")
    run_dir = sweep / "0_spmoe"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- method=spmoe\n- draft=tiny\n- hydra.verbose=false\n")
    (run_dir / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n  runtime:\n    choices: {}\n")
    cfg = tiny_run_config(method="spmoe", draft=load_preset("draft", "tiny"), num_prompts=1, max_new_tokens=6)
    cfg.method.num_slots = 12
    run_benchmark(cfg, run_dir)
    return run_dir


def test_log_run_history_tables_summary_and_artifact(wandb_offline, no_remote_connections, spmoe_run_dir):
    log_run(LoggerConfig(name="wandb"), spmoe_run_dir)
    wandb_offline.teardown()  # finish() only asks wandb-core to close the run file; teardown waits for it
    records = offline_records(spmoe_run_dir / "wandb")
    trace = [json.loads(line) for line in (spmoe_run_dir / "trace.jsonl").read_text().splitlines()]
    decode = [r for r in trace if r["phase"] == "decode"]

    steps = [row for row in history_rows(records) if "emitted_tokens" in row]
    assert len(steps) == len(decode) >= 3
    assert [row["step/latency_ms"] for row in steps] == pytest.approx([r["step_ms"] for r in decode])
    assert [row.get("step/accepted") for row in steps] == [r["num_accepted"] for r in decode]  # None: drafted nothing
    assert [row["emitted_tokens"] for row in steps] == [1 + sum(r["num_emitted"] for r in decode[: i + 1])
                                                        for i in range(len(decode))]
    assert {f"step/{n}" for n in ("hits", "misses", "prefetch_hits", "late_prefetches", "stall_ms")} <= set(steps[0])
    tables = {k.split("/")[0] for row in history_rows(records) for k in row if k.endswith("/nrows")}
    assert tables == {"layers", "tpot_breakdown"}

    metrics = {r.metric.glob_name or r.metric.name: r.metric.step_metric for r in records
               if r.WhichOneof("record_type") == "metric"}
    assert metrics.get("step/*") == "emitted_tokens"

    _, summary, config, runs = offline_run(spmoe_run_dir / "wandb")
    assert summary["method"] == "spmoe" and summary["breakdown/tpot_ms"] == pytest.approx(summary["tpot_ms"])
    assert summary["step_latency/num_steps"] == len(decode)
    (run,) = runs
    assert run.display_name == "method=spmoe,draft=tiny" and run.run_group == "sweep_cutoff0"
    assert run.job_type == "spmoe" and {"tiny", "spmoe", "routing:model"} <= set(run.tags)

    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "run"]
    assert len(artifacts) == 1
    files = {e.path for e in artifacts[0].manifest.contents}
    assert files == {"summary.json", "trace.jsonl", "generations.jsonl"}
    assert no_remote_connections == []


def test_run_identity_from_the_hydra_files(tmp_path):
    job = tmp_path / "sweeps" / "2026-01-01" / "3_spmoe"
    case = job / "auto"
    (job / ".hydra").mkdir(parents=True)
    case.mkdir()
    (job / ".hydra" / "overrides.yaml").write_text("- experiment=cpu/cutoff\n- model=tiny\n- logger=wandb\n")
    (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    (job / ".hydra" / "config.yaml").write_text("seed: 3\n")
    summary = {"method": "spmoe", "model": "tiny", "dataset": "synthetic", "hardware": "rtx4090",
               "hardware_emulated": True, "routing": "replay", "case": "auto", "experiment": "cpu/cutoff"}
    ident = run_identity(case, summary)
    assert ident == {"name": "experiment=cpu/cutoff,model=tiny,case=auto", "group": "cpu/cutoff",
                     "tags": ["tiny", "spmoe", "synthetic", "rtx4090", "routing:replay", "emulated"],
                     "job_type": "spmoe", "config": {"seed": 3}}
    summary.pop("experiment")
    assert run_identity(case, summary)["group"] == "2026-01-01"  # the sweep dir
    assert run_identity(tmp_path, {"method": "lru"})["name"] == "lru" and set(STEP_COLUMNS.values()) >= {"latency_ms"}


def test_tracker_logs_nested_int_keys_as_summary_json_does(wandb_offline, no_remote_connections, tmp_path):
    """Prefetching methods report `predictor_top1_by_layer` = {layer: accuracy}: wandb's summary encoder
    rejects int keys (TypeError), which crashed `logger=wandb method=spmoe` after summary.json was written."""
    logger = LoggerConfig(name="wandb")
    tracker = make_tracker(logger, {"method": {"name": "spmoe"}, "logger": vars(logger)}, str(tmp_path))
    try:
        tracker.log_summary({"method": "spmoe", "tpot_ms": 12.5, "acceptance_rate": None,
                             "predictor_top1_by_layer": {0: 0.5, 3: 0.25}, "per_pos": [1, 2]})
    finally:
        tracker.finish()
    wandb_offline.teardown()  # finish() only asks wandb-core to close the run file; teardown waits for it
    _, summary, config, runs = offline_run(tmp_path / "wandb")
    expected = {"method": "spmoe", "tpot_ms": 12.5, "predictor_top1_by_layer": {"0": 0.5, "3": 0.25}, "per_pos": [1, 2]}
    assert summary == expected
    assert config["method"] == {"name": "spmoe"}
    assert [r.job_type for r in runs] == ["spmoe"]
    assert no_remote_connections == []


def test_disabled_mode_writes_nothing(wandb_offline, no_remote_connections, tmp_path):
    tracker = make_tracker(LoggerConfig(name="wandb", mode="disabled"), {}, str(tmp_path))
    tracker.log_summary({"tpot_ms": 1.0, "predictor_top1_by_layer": {0: 1.0}})
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
    assert no_remote_connections == []


# ------------------------------------------------------------------------------------------------
# logger=none and config errors

def test_none_logger_is_a_null_tracker(tmp_path):
    tracker = make_tracker(LoggerConfig(name="none"), {}, str(tmp_path))
    assert isinstance(tracker, NullTracker)
    tracker.log_summary({"tpot_ms": 1.0})
    tracker.finish()
    log_run(LoggerConfig(name="none"), tmp_path)  # no summary.json needed: nothing is read
    assert list(tmp_path.iterdir()) == []


def test_bad_mode_lists_the_valid_modes(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # rejected before wandb is imported
    with pytest.raises(ValueError, match=r"logger.mode='onlin'; valid: offline, online, disabled"):
        make_tracker(LoggerConfig(name="wandb", mode="onlin"), {}, str(tmp_path))


def test_unknown_logger_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown logger 'tensorboard'; valid: none, wandb"):
        make_tracker(LoggerConfig(name="tensorboard"), {}, str(tmp_path))


def test_each_case_of_an_experiment_is_its_own_run(wandb_offline, no_remote_connections, spmoe_run_dir, tmp_path):
    """run.py logs every case after the experiment, one after another in one process."""
    import shutil

    job = tmp_path / "job"
    for case in ("auto", "off"):
        shutil.copytree(spmoe_run_dir, job / case, ignore=shutil.ignore_patterns("wandb", ".hydra"))
        summary = json.loads((job / case / "summary.json").read_text())
        (job / case / "summary.json").write_text(json.dumps({**summary, "case": case, "experiment": "cutoff"}))
        log_run(LoggerConfig(name="wandb"), job / case)
    wandb_offline.teardown()
    names = {}
    for case in ("auto", "off"):
        (run,) = offline_run(job / case / "wandb")[3]
        names[case] = (run.display_name, run.run_group)
    assert names == {"auto": ("case=auto", "cutoff"), "off": ("case=off", "cutoff")}
