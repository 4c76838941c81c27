"""
Prompt texts through Hugging Face `datasets`: `dataset=hf` (any hub dataset or local file) and the
paper's hub presets (`alpaca`, `cnn_dailymail`, `mmlu_pro`, see `conf/dataset/`).

Terms: `dataset.path` is a hub name (`owner/name`), a local file or a local directory of data
files; a *local* path is one that exists, ends in a known extension (.json/.jsonl/.parquet/.csv)
or starts with `/`, `.` or `~`, and it must exist. `dataset.field` is the column holding the prompt text; `dataset.split` the split,
`dataset.subset` the hub configuration name (a local file is one split; `split` is unused).
Invariants: `datasets` is imported only here, and only when one of these presets is used (the
packaged offline presets never need it). Offline (`HF_DATASETS_OFFLINE`/`HF_HUB_OFFLINE`, or a
connection error) a hub preset fails with one `DatasetError` line naming the preset and the
local-file alternative. Every error names what was given and what was found.
"""

from __future__ import annotations

import os
from pathlib import Path

from spmoe.config import DatasetConfig

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_PRESETS = ("alpaca", "cnn_dailymail", "mmlu_pro")
_TRUE = ("1", "true", "yes", "on")


class DatasetError(ValueError):
    """A dataset path, split or field that cannot be read, or a hub dataset that cannot be reached."""


def is_local(path: str) -> bool:
    return (Path(path).suffix.lower() in LOCAL_FORMATS or path.startswith(("/", ".", "~"))
            or Path(path).expanduser().exists())


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _offline_error(cfg: DatasetConfig, why: str) -> DatasetError:
    return DatasetError(
        f"dataset={cfg.name} loads {cfg.path!r} from the Hugging Face hub, which cannot be reached here ({why});"
        f" download it where there is network and point at the file: dataset=hf dataset.path=<file.jsonl|.parquet|"
        f".csv|.json> dataset.field={cfg.field or '<column>'}")


def _import_datasets():
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError("dataset=hf and the hub presets need the `datasets` package: pip install datasets"
                           " (the packaged presets humaneval, gsm8k, mtbench, synthetic do not)") from exc
    datasets.logging.set_verbosity_error()
    return datasets


def _load(cfg: DatasetConfig):
    """The `datasets.Dataset` of cfg's path and split."""
    path = cfg.path
    if is_local(path):
        file = Path(path).expanduser()
        if not file.exists():
            parent = file.parent if file.parent.is_dir() else None
            near = sorted(p.name for p in parent.iterdir())[:20] if parent else []
            raise DatasetError(f"dataset.path={path!r} does not exist"
                               + (f"; {parent} holds: {near}" if parent else f"; nor does its directory {file.parent}"))
        if file.is_dir():  # a directory of data files, read as one dataset with its splits
            datasets = _import_datasets()
            try:
                return datasets.load_dataset(str(file), cfg.subset, split=cfg.split)
            except Exception as exc:  # datasets wraps parser errors in its own types
                raise DatasetError(f"dataset.path={path!r} (a directory: {sorted(p.name for p in file.iterdir())[:20]})"
                                   f" could not be read as a dataset with split {cfg.split!r}: {exc}") from exc
        fmt = LOCAL_FORMATS.get(file.suffix.lower())
        if fmt is None:
            raise DatasetError(f"dataset.path={path!r}: unknown file type {file.suffix!r};"
                               f" valid: {sorted(LOCAL_FORMATS)} (or a hub dataset name)")
        datasets = _import_datasets()
        try:
            return datasets.load_dataset(fmt, data_files=str(file), split="train")  # a local file is one split
        except Exception as exc:  # datasets wraps parser errors in its own types
            raise DatasetError(f"dataset.path={path!r} could not be read as {fmt}: {exc}") from exc
    if _offline():
        raise _offline_error(cfg, "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set")
    datasets = _import_datasets()
    try:
        return datasets.load_dataset(path, cfg.subset, split=cfg.split)
    except ConnectionError as exc:
        raise _offline_error(cfg, type(exc).__name__) from None
    except (FileNotFoundError, ValueError) as exc:
        if "offline" in str(exc).lower() or "couldn't reach" in str(exc).lower():
            raise _offline_error(cfg, type(exc).__name__) from None
        raise DatasetError(f"dataset={cfg.name}: cannot load {path!r} (subset {cfg.subset!r}, split {cfg.split!r}):"
                           f" {exc}") from exc


def hub_texts(cfg: DatasetConfig) -> list[tuple[str, str]]:
    """(prompt id, text) for every row of cfg's split with a non-empty `field`."""
    if not cfg.path:
        raise DatasetError(f"dataset={cfg.name} needs dataset.path=<hub name or a local .jsonl/.parquet/.csv/.json file>")
    if not cfg.field:
        raise DatasetError(f"dataset={cfg.name} needs dataset.field=<the column holding the prompt text>")
    rows = _load(cfg)
    if cfg.field not in rows.column_names:
        raise DatasetError(f"dataset.field={cfg.field!r} is not a column of {cfg.path!r} (split {cfg.split});"
                           f" columns found: {rows.column_names}")
    out = []
    for i, text in enumerate(rows[cfg.field]):
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            raise DatasetError(f"dataset.field={cfg.field!r} of {cfg.path!r} holds {type(text).__name__} values"
                               f" (row {i}), not text; choose a text column of {rows.column_names}")
        out.append((f"{cfg.name}/{i}", text))
    if not out:
        raise DatasetError(f"dataset.field={cfg.field!r} of {cfg.path!r} (split {cfg.split}) has no non-empty text")
    return out
