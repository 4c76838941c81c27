"""
One GPU per concurrently running job of a Hydra multirun (the `hydra/callbacks=one_gpu_per_job` option,
used with `hydra/launcher=gpus`: joblib worker processes on one host).

Terms: a *worker* is a process that runs jobs one after another (joblib/loky reuses them across
jobs); the *GPU pool* is `gpus` (comma-separated ids), else the launching process's
CUDA_VISIBLE_DEVICES, else 0..n_jobs-1 from `hydra.launcher.n_jobs`.

Invariants: at the start of its first job a worker claims one GPU of the pool by taking an
exclusive `flock` on `<sweep dir>/.gpu_locks/<id>.lock` and sets CUDA_VISIBLE_DEVICES to it before
anything initialises CUDA; it keeps that GPU for all its later jobs (CUDA cannot change device once
initialised), and the lock is released when the worker exits. So no two running jobs share a GPU,
whichever worker gets which job. More workers than GPUs is an error at claim time, never a shared GPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)
_claimed: dict[str, object] = {}  # this process's GPU: {"gpu": id, "file": the open locked file}


def gpu_pool(gpus: str | None, n_jobs) -> list[str]:
    if gpus:
        return [g.strip() for g in str(gpus).split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()]
    n = int(n_jobs) if n_jobs is not None and int(n_jobs) > 0 else 1
    return [str(i) for i in range(n)]


def claim_gpu(lock_dir: Path, pool: list[str]) -> str:
    """This process's GPU: the one it holds, else the first free one of `pool` (locked until exit)."""
    if "gpu" in _claimed:
        return _claimed["gpu"]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in pool:
        f = open(lock_dir / f"{gpu}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        _claimed.update(gpu=gpu, file=f)
        return gpu
    raise RuntimeError(f"every GPU of {pool} is held by another running job: set hydra.launcher.n_jobs <= "
                       f"{len(pool)} (locks in {lock_dir})")


class OneGpuPerJob(Callback):
    def __init__(self, gpus: str | None = None):
        self.gpus = gpus

    def on_job_start(self, config, **kwargs) -> None:
        hydra = config.hydra
        pool = gpu_pool(self.gpus, hydra.launcher.get("n_jobs"))  # read only until this process holds a GPU
        gpu = claim_gpu(Path(hydra.sweep.dir) / ".gpu_locks", pool)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("job %s runs on GPU %s (CUDA_VISIBLE_DEVICES=%s, worker pid %d)", hydra.job.num, gpu, gpu,
                 os.getpid())
