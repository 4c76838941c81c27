"""
Experiment trackers: `none` (does nothing, same methods) and `wandb` (offline by default).

W&B is optional: `logger=wandb` imports it lazily and fails with an install hint if missing.
"""

from __future__ import annotations

from spmoe.config import LoggerConfig


class NullTracker:
    def log_summary(self, summary: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg: LoggerConfig, config: dict, out_dir: str):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("logger=wandb needs wandb: pip install 'spmoe[wandb]' (or use logger=none)") from exc
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, mode=cfg.mode, dir=out_dir, config=config,
                              job_type=config.get("method", {}).get("name"))

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})

    def finish(self) -> None:
        self.run.finish()


def make_tracker(cfg: LoggerConfig, config: dict, out_dir: str):
    if cfg.name == "none":
        return NullTracker()
    if cfg.name == "wandb":
        if cfg.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={cfg.mode!r}; valid: offline, online, disabled")
        return WandbTracker(cfg, config, out_dir)
    raise ValueError(f"unknown logger {cfg.name!r}; valid: none, wandb")
