"""
Entry point: `python run.py model=<m> dataset=<d> method=<x> hardware=<h> [key=value ...]`, and
`python run.py [-m] experiment=<name>` for the cases of a paper experiment in interleaved rounds.

The only Hydra-aware file besides tests. It composes `conf/`, resolves the `auto` choices
(`spmoe.auto`: the model's paired draft, its paper card on CUDA, replayed routing for random
weights) by composing again with them, composes each experiment case the same way, converts every
case once to the typed `RunConfig`, and hands the cases to `spmoe.experiment.run_cases` under a
lock on the run directory. It prints a short digest per case and, last, the summary as one JSON
object (an experiment: one object mapping case names to summaries).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from spmoe.config import RunConfig, register_configs, unknown_keys

register_configs()
OmegaConf.register_new_resolver(  # a sweep job's directory: its swept values, filesystem-safe
    "spmoe_subdir", lambda overrides, num: "".join(c if c.isalnum() or c in "=,._-" else "_" for c in overrides)
    or f"job{num}")
log = logging.getLogger("run")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _compose(overrides: list[str]) -> tuple[RunConfig, dict]:
    """Compose `overrides`, resolve `auto` choices by composing again with them; (typed, plain) config."""
    import torch

    from spmoe.auto import auto_choices

    dcfg = compose(config_name="config", overrides=overrides)
    choices = auto_choices(OmegaConf.to_object(dcfg), torch.cuda.is_available())
    if choices:
        taken = {_key(o) for o in overrides}
        extra = [f"{k}={v}" for k, v in choices.items() if k not in taken]
        dcfg = compose(config_name="config", overrides=[*overrides, *extra])
        log.info("resolved auto choices: %s", " ".join(extra))
    plain = OmegaConf.to_container(dcfg, resolve=True)
    extra = unknown_keys(plain)
    if extra:
        raise ValueError(f"unknown config key(s) {extra}: no such setting (see `python run.py --cfg job`)")
    return OmegaConf.to_object(dcfg), plain


def _cases(dcfg: DictConfig, overrides: list[str], out_dir: Path):
    from spmoe.experiment import Case

    if dcfg.experiment.name is None:
        cfg, plain = _compose(overrides)
        return [Case(None, cfg, out_dir, plain)]
    only = list(dcfg.experiment.get("only") or [])
    unknown = sorted(set(only) - set(dcfg.experiment.cases))
    if unknown:
        raise ValueError(f"experiment.only names cases that {dcfg.experiment.name!r} does not define: {unknown}"
                         f" (valid: {sorted(dcfg.experiment.cases)})")
    cases = []
    for name, case_overrides in dcfg.experiment.cases.items():
        if only and name not in only:
            continue
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"experiment case name {name!r}: use letters, digits, '_', '-' and '.' only")
        keys = {_key(o) for o in case_overrides}
        merged = [o for o in overrides if _key(o) not in keys] + list(case_overrides)
        cfg, plain = _compose(merged)
        cases.append(Case(name, cfg, out_dir / name, plain))
    if not cases:
        raise ValueError(f"experiment {dcfg.experiment.name!r} defines no cases")
    return cases


def _write_hydra_files(out_dir: Path, dcfg: DictConfig, hc) -> None:
    """`.hydra/{config,overrides,hydra}.yaml`, written under the lock (Hydra's own copy would be
    written before it, so a rejected second run would overwrite the first run's record)."""
    from spmoe.io import write_text_atomic

    record = {"config.yaml": OmegaConf.to_yaml(dcfg), "overrides.yaml": OmegaConf.to_yaml(hc.overrides.task),
              "hydra.yaml": OmegaConf.to_yaml({"hydra": hc})}
    for name, text in record.items():
        write_text_atomic(out_dir / ".hydra" / name, text)


def _progress(setting: str, multirun: bool) -> bool:
    setting = str(setting).lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"progress={setting!r}; valid: auto, true, false")
    return setting == "true" or (setting == "auto" and not multirun and sys.stderr.isatty())


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    """Returns the run's median TPOT in ms (an experiment's: its first case's; NaN when nothing was
    decoded), the objective a Hydra sweeper such as Optuna minimizes. A bad input or a machine that
    cannot hold the run ends a single run with one line on stderr (exit status 2); in a multirun the
    error propagates so Hydra reports the failing job."""
    try:
        return _main(dcfg)
    except (ValueError, MemoryError, RuntimeError, FileNotFoundError) as exc:
        if HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _main(dcfg: DictConfig) -> float:
    from spmoe.digest import digest
    from spmoe.experiment import run_cases
    from spmoe.rundir import RunDirLock
    from spmoe.time_limit import TimeLimit
    from spmoe.tracking import log_run

    time_limit = TimeLimit(dcfg.experiment.get("time_limit_s"))  # from here: the build counts against it
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    overrides = [o for o in hc.overrides.task if not _key(o).startswith("hydra.")]
    with RunDirLock(out_dir):
        _write_hydra_files(out_dir, dcfg, hc)
        cases = _cases(dcfg, overrides, out_dir)
        exp = dcfg.experiment
        summaries = run_cases(cases, rounds=exp.rounds, warmup_tokens=exp.warmup_tokens,
                              experiment=exp.name, resume=dcfg.resume, profile=exp.profile,
                              progress=_progress(dcfg.progress, hc.mode == RunMode.MULTIRUN), time_limit=time_limit)
    for case, summary in zip(cases, summaries):
        if "error" not in summary and "skipped" not in summary:
            log_run(case.cfg.logger, case.out_dir, group=exp.name)
        for line in digest(summary):
            print(line)
    printed = [{k: v for k, v in s.items() if k != "config"} for s in summaries]  # summary.json keeps the config
    print(json.dumps(printed[0] if exp.name is None else {c.name: s for c, s in zip(cases, printed)}))
    failed = [c.name for c, s in zip(cases, summaries) if "error" in s]
    if failed:
        raise RuntimeError(f"experiment {exp.name}: case(s) {failed} failed (see their error.json); the others"
                           f" finished in {out_dir}")
    tpot_ms = summaries[0].get("tpot_ms_median") or summaries[0].get("tpot_ms")
    return float("nan") if tpot_ms is None else float(tpot_ms)  # None: no decode step (max_new_tokens=1)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main()
