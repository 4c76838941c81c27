"""
Experiment trackers: `none` (does nothing, same methods) and `wandb` (offline by default).

W&B is optional: `logger=wandb` imports it lazily and fails with an install hint if missing.
Summary values are logged as summary.json stores them: nested dict keys become strings (wandb's
summary encoder rejects non-str keys, e.g. `predictor_top1_by_layer` = {layer: accuracy}).
"""

from __future__ import annotations

from spmoe.config import LoggerConfig


def _str_keys(value):
    """`value` with every nested dict key turned into a string, as json.dumps writes it."""
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_str_keys(v) for v in value]
    return value


class NullTracker:
    def log_summary(self, summary: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
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
        self.run.summary.update({str(k): _str_keys(v) for k, v in summary.items() if v is not None})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)  # a failed benchmark shows as failed in W&B


def make_tracker(cfg: LoggerConfig, config: dict, out_dir: str):
    if cfg.name == "none":
        return NullTracker()
    if cfg.name == "wandb":
        if cfg.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={cfg.mode!r}; valid: offline, online, disabled")
        return WandbTracker(cfg, config, out_dir)
    raise ValueError(f"unknown logger {cfg.name!r}; valid: none, wandb")
