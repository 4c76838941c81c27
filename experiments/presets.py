"""
Loading `conf/<group>/<name>.yaml` presets as typed dataclasses without Hydra.

For scripts that run where Hydra is not installed (the GPU machine) and for tests. Only the
preset's own keys are read (the `defaults` list is Hydra's and is skipped).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from spmoe.config import (
    CutoffConfig,
    DatasetConfig,
    DraftConfig,
    HardwareConfig,
    LoggerConfig,
    MethodConfig,
    ModelConfig,
    TwinConfig,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_GROUPS = {"model": ModelConfig, "draft": DraftConfig, "dataset": DatasetConfig, "method": MethodConfig,
           "hardware": HardwareConfig, "logger": LoggerConfig}


def preset_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_preset(group: str, name: str, **overrides):
    if group not in _GROUPS:
        raise ValueError(f"unknown config group {group!r}; valid: {sorted(_GROUPS)}")
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown {group} {name!r}; valid: {preset_names(group)}")
    data = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "defaults"}
    data.update(overrides)
    if group == "model" and isinstance(data.get("twin"), dict):
        data["twin"] = TwinConfig(**data["twin"])
    if group == "method" and isinstance(data.get("cutoff"), dict):
        data["cutoff"] = CutoffConfig(**data["cutoff"])
    return _GROUPS[group](**data)
