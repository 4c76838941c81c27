"""
Experiment tracking: `none` (a tracker that does nothing) and `wandb` (offline unless told otherwise).

A W&B run mirrors one run directory (DESIGN.md section 9), logged from the files the run wrote, so
tracking never touches the engine and a finished run can be logged at any time:
- `log_run(logger_cfg, run_dir)`: the one call after each run (or each case of an experiment):
  opens a W&B run, logs everything below from `run_dir`, finishes it.
- history: one row per decode step (`analysis.trace.step_table`) under `step/` (latency, emitted,
  drafted and accepted tokens, draft / verify / stall ms, H2D bytes, expert hits, misses, prefetch
  hits, late and wasted prefetches), all charted against `emitted_tokens` (`define_metric`): the
  tokens the run has emitted so far, prefill tokens included;
- tables: `layers` (per MoE layer: events, hit rate, coverage, predictor accuracy) and
  `tpot_breakdown` (draft / verify / stall / other ms per token);
- summary: summary.json as written (nested dict keys become strings, as json.dumps writes them:
  wandb's summary encoder rejects int keys) plus `breakdown/*` and `step_latency/*`;
- identity: name = the run's Hydra overrides (`.hydra/overrides.yaml` in the run dir or the job dir
  above a case) joined by commas, with the case name; group = the summary's `experiment`, else the
  sweep dir's name for a multirun job; tags = model, method, dataset, card, `routing:<source>`,
  `emulated` when the card was; job_type = method; config = the summary's `config`, else
  `.hydra/config.yaml`;
- artifact (type `run`): summary.json, trace.jsonl, generations.jsonl and routing_trace.npz, those present.
`make_tracker` opens one tracker (`log_summary`, `log_run_dir`, `finish`); `log_run` uses it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import yaml

from spmoe.config import LoggerConfig

log = logging.getLogger(__name__)
VALID_MODES = ("offline", "online", "disabled")
ARTIFACT_FILES = ("summary.json", "trace.jsonl", "generations.jsonl", "routing_trace.npz")
STEP_COLUMNS = {"num_emitted": "emitted", "step_ms": "latency_ms", "num_drafted": "drafted",
                "num_accepted": "accepted", "draft_ms": "draft_ms", "verify_ms": "verify_ms", "stall_ms": "stall_ms",
                "h2d_bytes": "h2d_bytes", "hits": "hits", "misses": "misses", "prefetch_hits": "prefetch_hits",
                "late": "late_prefetches", "wasted": "wasted_prefetches", "prefetched": "prefetches_issued"}


def _str_keys(value):
    """`value` with every nested dict key turned into a string, as json.dumps writes it."""
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_str_keys(v) for v in value]
    return value


def _hydra_file(run_dir: Path, name: str) -> Path | None:
    """`.hydra/<name>` of the run dir, or of the job dir above an experiment's case dir."""
    for d in (run_dir, run_dir.parent):
        if (d / ".hydra" / name).is_file():
            return d / ".hydra" / name
    return None


def run_identity(run_dir: Path, summary: dict) -> dict:
    """name, group, tags, job_type and config of the W&B run for `run_dir` (module docstring)."""
    overrides_file = _hydra_file(run_dir, "overrides.yaml")
    overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file else []
    parts = [o for o in overrides if not o.startswith(("hydra.", "logger"))]
    if summary.get("case"):
        parts.append(f"case={summary['case']}")
    name = ",".join(parts) or summary.get("case") or summary.get("method") or run_dir.name
    group = summary.get("experiment")
    hydra_file = _hydra_file(run_dir, "hydra.yaml")
    if group is None and hydra_file is not None:
        mode = re.search(r"^\s*mode:\s*(\w+)", hydra_file.read_text(), re.MULTILINE)
        if mode and mode.group(1) == "MULTIRUN":
            group = hydra_file.parent.parent.parent.name  # <sweep dir>/<job dir>/.hydra/hydra.yaml
    tags = [str(summary[k]) for k in ("model", "method", "dataset", "hardware") if summary.get(k)]
    tags.append(f"routing:{summary.get('routing') or 'model'}")
    if summary.get("hardware_emulated"):
        tags.append("emulated")
    config = summary.get("config")
    if config is None:
        config_file = _hydra_file(run_dir, "config.yaml")
        config = yaml.safe_load(config_file.read_text()) if config_file else {}
    return {"name": name, "group": group, "tags": tags, "job_type": summary.get("method"), "config": config}


class NullTracker:
    def log_summary(self, summary: dict) -> None:
        pass

    def log_run_dir(self, run_dir) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    """One W&B run. `log_run_dir` logs a finished run dir's history, tables, summary and artifact."""

    def __init__(self, cfg: LoggerConfig, config: dict, out_dir: str, name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, job_type: str | None = None):
        import wandb

        self._wandb = wandb
        method = config.get("method")
        job_type = job_type or (method.get("name") if isinstance(method, dict) else method)
        self.run = wandb.init(project=cfg.project, mode=cfg.mode, dir=out_dir, config=config, name=name,
                              group=group, tags=tags, job_type=job_type, reinit="create_new")

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update({str(k): _str_keys(v) for k, v in summary.items() if v is not None})

    def log_run_dir(self, run_dir) -> None:
        from analysis.trace import layer_table, read_trace, step_latency, step_table, tpot_breakdown

        run_dir = Path(run_dir)
        self.log_summary(json.loads((run_dir / "summary.json").read_text()))
        if (run_dir / "trace.jsonl").is_file():
            records = read_trace(run_dir)
            self.run.define_metric("emitted_tokens")
            self.run.define_metric("step/*", step_metric="emitted_tokens")
            for row in step_table(records).to_dict("records"):
                values = {f"step/{name}": row[col] for col, name in STEP_COLUMNS.items()
                          if row.get(col) is not None and row[col] == row[col]}  # NaN != NaN: absent without SD
                self.run.log({"emitted_tokens": row["emitted_total"], **values})
            layers = layer_table(records)
            if len(layers):
                self.run.log({"layers": self._wandb.Table(dataframe=layers)})
            breakdown = tpot_breakdown(records)
            self.run.log({"tpot_breakdown": self._wandb.Table(columns=list(breakdown),
                                                              data=[list(breakdown.values())])})
            self.run.summary.update({f"breakdown/{k}": v for k, v in breakdown.items() if v is not None})
            self.run.summary.update({f"step_latency/{k}": v for k, v in step_latency(records).items()})
        artifact = self._wandb.Artifact(f"run-{self.run.id}", type="run")
        for name in ARTIFACT_FILES:
            if (run_dir / name).is_file():
                artifact.add_file(str(run_dir / name))
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)  # a failed benchmark shows as failed in W&B


def _check(cfg: LoggerConfig) -> None:
    if cfg.name not in ("none", "wandb"):
        raise ValueError(f"unknown logger {cfg.name!r}; valid: none, wandb")
    if cfg.name == "wandb" and cfg.mode not in VALID_MODES:
        raise ValueError(f"logger.mode={cfg.mode!r}; valid: {', '.join(VALID_MODES)}")


def make_tracker(cfg: LoggerConfig, config: dict, out_dir: str, **identity):
    """A tracker for one run: `identity` = name, group, tags, job_type (all optional)."""
    _check(cfg)
    if cfg.name == "none":
        return NullTracker()
    return WandbTracker(cfg, config, out_dir, **identity)


def log_run(cfg: LoggerConfig, run_dir, group: str | None = None) -> None:
    """Logs the finished run in `run_dir` as one W&B run (files under `run_dir/wandb`); a no-op for logger=none."""
    _check(cfg)
    if cfg.name == "none":
        return
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    identity = run_identity(run_dir, summary)
    config = identity.pop("config")
    identity["group"] = group or identity["group"]
    tracker = make_tracker(cfg, config, str(run_dir), **identity)
    try:
        tracker.log_run_dir(run_dir)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
