"""
Run directories: the config hash that ties a summary to its config, resume, and the lock.

Terms: a *finished* run directory holds `summary.json` whose `config_hash` equals the hash of the
config that would run there now. The hash covers every key that changes results (the resolved
config without `resume`, `progress`, `logger`, the experiment's other cases, and which of them run in
this process and for how long: `experiment.only`, `experiment.time_limit_s`). Invariants:
resume reuses a directory only when its hash matches; otherwise (and always under `resume=false`)
the old summary is removed before the run starts, so a killed rerun never leaves a summary that
looks finished for the new config. A directory in use is locked (`.lock`, an advisory `flock`
released when the process dies): a second run into it fails at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_UNHASHED_KEYS = ("resume", "progress", "logger")
# which cases run in this process and how long it may take: neither changes a case's results
_UNHASHED_EXPERIMENT_KEYS = ("cases", "description", "only", "time_limit_s")


class RunDirBusyError(RuntimeError):
    pass


def hashed_config(config: dict) -> dict:
    """The part of a resolved config (plain dict) that changes results."""
    out = {k: v for k, v in config.items() if k not in _UNHASHED_KEYS}
    if isinstance(out.get("experiment"), dict):
        out["experiment"] = {k: v for k, v in out["experiment"].items() if k not in _UNHASHED_EXPERIMENT_KEYS}
    return out


def config_hash(config: dict) -> str:
    blob = json.dumps(hashed_config(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished_summary(run_dir: Path, expected_hash: str) -> dict | None:
    """The summary of a finished run of this exact config, or None. A summary of another config is
    removed (with a log line): the run is redone. A summary that records its config is judged by that
    config's hash under today's rule (`hashed_config`), so a key newly left out of the hash does not
    redo runs made before."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON: rerunning", path)
        path.unlink()
        return None
    recorded = config_hash(summary["config"]) if isinstance(summary.get("config"), dict) else summary.get("config_hash")
    if recorded == expected_hash:
        return summary
    log.warning("%s was written for another config (hash %s, now %s): rerunning", path, recorded, expected_hash)
    path.unlink()
    return None


def discard_summary(run_dir: Path) -> None:
    """Remove a run directory's summary before it is run again (`resume=false`): until the new run
    finishes, nothing there looks finished."""
    path = Path(run_dir) / "summary.json"
    if path.is_file():
        log.info("%s: rerunning (resume=false); the old summary is removed first", path)
        path.unlink()


class RunDirLock:
    """`with RunDirLock(dir):` holds an exclusive lock on `dir/.lock` or fails at once."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusyError(f"run directory {self.path.parent} is in use by {holder}; choose another"
                                  " (hydra.run.dir=...) or wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the file stays: unlinking it would race with a waiting opener
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
