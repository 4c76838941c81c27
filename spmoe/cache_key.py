"""
Content keys for on-disk caches (SP-MoE's cutoff profiles and hidden maps, under ~/.cache/spmoe).

Terms: a cache entry's *fields* are a JSON-able dict of everything its contents depend on (the
models' resolved transformers configs, where their weights come from, dtypes, device, ...); its
*key* is `content_key(fields)`, a 16-hex-digit SHA-256 prefix of the fields' canonical JSON.
Invariants: keys are computed from contents, never from preset names, so two presets that differ
in any field never share an entry and an entry is reused only for identical fields; entry files
store their fields, and a reader compares them (a hash collision reads as a miss). Weights are
fingerprinted without reading them: a checkpoint by its config.json digest and its
*.safetensors names, sizes and modification times; random and twin weights by the run's seed.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

KEY_HEX_DIGITS = 16
_DIGESTS: dict[tuple[str, int, int], str] = {}


def canonical(fields: Any) -> Any:
    """`fields` as plain JSON values (tuples -> lists, dtypes and paths -> strings)."""
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def content_key(fields: dict) -> str:
    text = json.dumps(canonical(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_HEX_DIGITS]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoized per path, size and modification time)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def weights_source(weights: str, path: str | None, seed: int) -> dict:
    """Where a model's weights come from: a checkpoint's fingerprint, or the seed of random/twin weights."""
    if weights != "checkpoint" or not path:
        return {"weights": weights, "seed": seed}
    root = Path(path).expanduser()
    files = sorted(root.glob("*.safetensors"))
    config = root / "config.json"
    return {"weights": weights, "path": str(root.resolve()),
            "config_sha256": file_digest(config) if config.is_file() else None,
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def model_config_fields(hf_config) -> dict:
    """A transformers config as the dict of every value it resolves to (defaults included)."""
    return canonical(hf_config.to_dict())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
