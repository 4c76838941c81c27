"""conf/hydra/: the launcher, callback and sweeper options compose with the real conf/, and run.

- composition: `hydra/launcher=gpus|slurm|local_gpus`, `hydra/callbacks=one_gpu_per_job`, `hydra/sweeper=tune_spmoe`;
- spmoe.launch: concurrent workers claim distinct GPUs, a worker keeps its GPU, one too many fails;
- end to end with a stand-in task (the real conf/, no model: ~10 s each): joblib runs 4 jobs in 2 worker
  processes at once, each job seeing one GPU id, never one GPU for two workers; Optuna runs its trials over
  the configured space and writes the best parameters.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.presets import CONF_DIR
from spmoe import launch
from spmoe.config import register_configs

register_configs()
REPO = Path(__file__).resolve().parent.parent


def _hydra(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra


def test_gpus_launcher_and_callback_compose(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    monkeypatch.setenv("SPMOE_NUM_GPUS", "4")
    hydra = _hydra("hydra/launcher=gpus", "hydra/callbacks=one_gpu_per_job")
    assert hydra.launcher._target_.endswith("JoblibLauncher")
    assert hydra.launcher.n_jobs == 4 and hydra.launcher.prefer == "processes"
    assert OmegaConf.to_container(hydra.callbacks) == {
        "one_gpu_per_job": {"_target_": "spmoe.launch.OneGpuPerJob", "gpus": None}}


def test_slurm_and_local_launchers_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    slurm = _hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu").launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.gpus_per_node, slurm.tasks_per_node, slurm.partition, slurm.mem_gb) == (1, 1, "gpu", 128)
    local = _hydra("hydra/launcher=local_gpus").launcher
    assert local._target_.endswith("LocalLauncher") and local.gpus_per_node == 1


def test_optuna_sweeper_composes_over_cutoff_topk_eviction():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweeper = _hydra("hydra/sweeper=tune_spmoe").sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    assert set(sweeper.params) == {"method.cutoff.mode", "method.cutoff.layer", "method.predict_top_k",
                                   "method.eviction"}


def _claim_and_report(lock_dir: str, pool: list[str], barrier, out) -> None:
    try:
        gpu = launch.claim_gpu(Path(lock_dir), pool)
        again = launch.claim_gpu(Path(lock_dir), pool)  # a worker keeps its GPU
        out.put((gpu, again))
    except RuntimeError as exc:
        out.put(("error", str(exc)))
    barrier.wait()  # hold the lock until every worker has tried


def test_concurrent_workers_claim_distinct_gpus(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_claim_and_report, args=(str(tmp_path), ["0", "1"], barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[:2] == [("0", "0"), ("1", "1")]
    assert results[2][0] == "error" and "n_jobs <= 2" in results[2][1]


def test_gpu_pool_from_setting_environment_or_n_jobs(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert launch.gpu_pool("5, 6", 2) == ["5", "6"]
    assert launch.gpu_pool(None, 8) == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launch.gpu_pool(None, 3) == ["0", "1", "2"] and launch.gpu_pool(None, -1) == ["0"]


STAND_IN = textwrap.dedent('''
    """A stand-in for run.py on the real conf/: records each job's GPU and returns a made-up TPOT."""
    import json, os, sys, time
    from pathlib import Path
    import hydra
    from hydra.core.hydra_config import HydraConfig
    sys.path.insert(0, {repo!r})
    import run  # run.py's schemas and resolvers (its module body), as every job of the real entry point has them

    @hydra.main(version_base="1.3", config_path={conf!r}, config_name="config")
    def main(cfg):
        out = Path(HydraConfig.get().runtime.output_dir)
        start = time.time()
        time.sleep(1.0)
        m = cfg.method
        (out / "job.json").write_text(json.dumps({{"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                                                  "start": start, "end": time.time()}}))
        return float(abs((m.cutoff.layer or 0) - 2) + (m.predict_top_k or 2) + (m.eviction == "lru"))

    if __name__ == "__main__":
        main()
''')


def _stand_in(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN.format(repo=str(REPO), conf=str(CONF_DIR)))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["SPMOE_NUM_GPUS"] = "2"
    return subprocess.run([sys.executable, str(script), "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_joblib_runs_jobs_in_parallel_one_gpu_per_worker(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = _stand_in(tmp_path, "hydra/launcher=gpus", "hydra/callbacks=one_gpu_per_job", "seed=0,1,2,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/job.json"))]
    assert len(jobs) == 4
    by_pid = {}
    for job in jobs:
        by_pid.setdefault(job["pid"], set()).add(job["gpu"])
    assert len(by_pid) == 2 and all(len(g) == 1 for g in by_pid.values())  # a worker keeps one GPU
    assert sorted(g for gs in by_pid.values() for g in gs) == ["0", "1"]  # two workers, two GPUs
    first, second = sorted(jobs, key=lambda j: j["start"])[:2]
    assert second["start"] < first["end"], "the first two jobs did not overlap"


def test_optuna_sweeper_searches_and_reports_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = _stand_in(tmp_path, "method=spmoe", "hydra/sweeper=tune_spmoe", "hydra.sweeper.n_trials=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = list((tmp_path / "sweep").glob("*/job.json"))  # a repeated parameter set reuses its job dir
    assert 2 <= len(jobs) <= 6 and all("method.predict_top_k=" in p.parent.name for p in jobs)
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best = result["best_params"]
    assert best["method.cutoff.layer"] in (0, 1, 2, 3) and best["method.predict_top_k"] in (1, 2, 3)
    assert best["method.eviction"] in ("lru", "layer_distance")
    assert result["best_value"] == abs(best["method.cutoff.layer"] - 2) + best["method.predict_top_k"] + (
        best["method.eviction"] == "lru")
