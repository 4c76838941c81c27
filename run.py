"""
Entry point: `python run.py model=<m> dataset=<d> method=<x> hardware=<h> [key=value ...]`.

The only Hydra-aware file besides tests: composes `conf/`, converts it once to the typed
`RunConfig`, runs `spmoe.session.run_benchmark` into Hydra's run directory and prints the
summary as one JSON object on the last stdout line. A run directory that already holds a
summary.json is a finished run: with `resume=true` (default) it is reported, not redone, so an
interrupted multirun restarted with the same `hydra.sweep.dir` only runs the missing jobs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from spmoe.config import RunConfig, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    out_dir = HydraConfig.get().runtime.output_dir
    done = Path(out_dir) / "summary.json"
    if cfg.resume and done.is_file():  # an interrupted sweep, rerun: finished jobs are not redone
        logging.getLogger(__name__).info("%s exists: run already finished, not redone (resume=false to rerun)", done)
        print(json.dumps(json.loads(done.read_text())))
        return
    from spmoe.session import run_benchmark
    from experiments.tracker import make_tracker

    tracker = make_tracker(cfg.logger, OmegaConf.to_container(dcfg, resolve=True), out_dir)
    try:
        summary = run_benchmark(cfg, out_dir)
        tracker.log_summary(summary)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    print(json.dumps(summary))


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    main()
