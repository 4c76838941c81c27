"""
Learned draft->target hidden map, for draft/target pairs that are not structurally twinned
(e.g. Qwen3-0.6B -> Qwen3-30B-A3B: other hidden size and depth).

Target MoE layer l is paired with draft layer round(l (D - 1) / (T - 1)) (D, T = depths); per
pair an affine map W [H_d + 1, H_t] is fitted by least squares from the draft's hidden states at
the capture point to the target's router input, on calibration token sequences (teacher-forced
through both models). For twins the map is not needed (identity).
Cache: `<dir>/maps-<key>.safetensors`, the key being `spmoe.cache_key.content_key` of the fields
the maps depend on (both models' resolved configs and weight sources, dtypes, capture point,
calibration seed and shape, device type, `MAP_FORMAT`), which the file also stores in its
metadata; a file is reused only when its stored fields equal the run's. Written atomically under a
unique temporary name in the same directory, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from spmoe.cache_key import canonical, content_key
from spmoe.predict.capture import capture_hidden, router_of

MAP_FORMAT = 2  # 2: content-keyed files with their fields in the metadata

log = logging.getLogger(__name__)


def layer_pairs(num_draft_layers: int, num_target_layers: int, target_layers: list[int]) -> dict[int, int]:
    """Target layer -> draft layer at the same relative depth."""
    if num_target_layers == 1:
        return {layer: 0 for layer in target_layers}
    return {layer: round(layer * (num_draft_layers - 1) / (num_target_layers - 1)) for layer in target_layers}


@torch.no_grad()
def fit_maps(draft: nn.Module, target: nn.Module, target_layers: list[int], sequences: list[list[int]],
             capture_point: str, device: torch.device) -> dict[int, torch.Tensor]:
    """Least-squares affine maps {target layer: W [H_d + 1, H_t]} (float32)."""
    pairs = layer_pairs(len(draft.model.layers), len(target.model.layers), target_layers)
    xs: dict[int, list[torch.Tensor]] = {layer: [] for layer in target_layers}
    ys: dict[int, list[torch.Tensor]] = {layer: [] for layer in target_layers}
    for seq in sequences:
        ids = torch.tensor([seq], device=device)
        with capture_hidden(draft, capture_point) as hidden:
            draft(input_ids=ids, logits_to_keep=1)
        router_inputs: dict[int, torch.Tensor] = {}
        handles = [router_of(target, layer).register_forward_pre_hook(
            lambda m, a, layer=layer: router_inputs.__setitem__(layer, a[0].reshape(-1, a[0].shape[-1])))
            for layer in target_layers]
        try:
            target(input_ids=ids, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        for layer in target_layers:
            xs[layer].append(hidden[pairs[layer]].float())
            ys[layer].append(router_inputs[layer].float())
    maps = {}
    for layer in target_layers:
        x = torch.cat(xs[layer]).cpu()  # [N, H_d]
        x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)  # [N, H_d + 1]
        y = torch.cat(ys[layer]).cpu()  # [N, H_t]
        maps[layer] = torch.linalg.lstsq(x, y).solution  # [H_d + 1, H_t]
    return maps


def maps_path(cache_dir: str | Path, fields: dict) -> Path:
    return Path(cache_dir).expanduser() / f"maps-{content_key({**fields, 'format': MAP_FORMAT})}.safetensors"


def _stored_fields(path: Path) -> dict | None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["fields"]) if "fields" in meta else None


def load_or_fit(cache_dir: str | Path, fields: dict, fit: Callable[[], dict[int, torch.Tensor]]
                ) -> dict[int, torch.Tensor]:
    """The cached maps for `fields`, or `fit()`'s, saved atomically."""
    fields = canonical({**fields, "format": MAP_FORMAT})
    path = maps_path(cache_dir, fields)
    if path.is_file() and _stored_fields(path) == fields:
        return {int(k): v for k, v in load_file(str(path)).items()}
    maps = fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({str(k): v.contiguous() for k, v in maps.items()}, tmp, metadata={"fields": json.dumps(fields)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("fitted %d draft->target hidden maps, cached at %s", len(maps), path)
    return maps
