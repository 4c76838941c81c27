"""
Reading a local HF-style safetensors checkpoint of a transformers MoE model, expert by expert.

Terms: a *checkpoint* is a directory of `*.safetensors` files (optionally listed by
`model.safetensors.index.json`). *Expert tensors* are a routed layer's experts; everything else
(attention, norms, routers, shared experts, dense MLPs, embeddings) is *non-expert*. The model
side is transformers 5.x (Mixtral, PhiMoE, Qwen2/3-MoE, OLMoE, DeepSeek-V2): its experts module
holds fused `gate_up_proj [E, 2I, H]` (gate rows, then up rows) and `down_proj [E, H, I]`.

Expert tensors on disk come in one of two layouts, per layer:
  fused:      `...layers.{l}.mlp.experts.gate_up_proj` [E, 2I, H] and `...down_proj` [E, H, I];
  per-expert: `...layers.{l}.block_sparse_moe.experts.{e}.w1|w3|w2.weight` (Mixtral, PhiMoE) or
              `...layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight` (the others);
              gate/up are [I, H], down is [H, I]. transformers 5.24's `save_pretrained` writes
              this layout (it reverses its load-time conversion), with Mixtral/PhiMoE's
              legacy `block_sparse_moe.` module name.
Legacy non-expert names are mapped: `block_sparse_moe.X` -> `mlp.X`, and PhiMoE's
`block_sparse_moe.gate.weight` -> `mlp.router.weight`; a missing `lm_head.weight` is read from
`model.embed_tokens.weight` when config.json says the embeddings are tied.

Invariants: `read_expert` reads only that one expert's bytes (`get_slice(key)[e]` on fused
tensors), never a layer's whole fused tensor; nothing holds the whole checkpoint in RAM (files
are memory-mapped by safetensors, tensors read one at a time). A key lives in exactly one file.
Every error is a `CheckpointError` naming the file(s) (and key) involved and what was expected;
`check_model` compares every tensor's header shape with the model built from config.json before
any weight is read.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"

# prefix, layer, then either a fused name or (expert index, per-expert projection name)
_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\."
    r"(?:(?P<fused>gate_up_proj|down_proj)|(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight)$"
)
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_MLP_RE = re.compile(r"(\.layers\.\d+\.)mlp\.")


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor is missing, unreadable or inconsistent."""


class Checkpoint:
    """An opened checkpoint directory: the safetensors files and a key -> file index."""

    def __init__(self, path: Path, handles: dict[Path, Any], key_to_file: dict[str, Path], tied: bool):
        self.path = path
        self.files = sorted(handles)
        self.tie_word_embeddings = tied
        self._handles = handles
        self._key_to_file = key_to_file
        self._fused: dict[tuple[int, str], str] = {}            # (layer, "gate_up"|"down") -> key
        self._per_expert: dict[tuple[int, int, str], str] = {}  # (layer, expert, "gate"|"up"|"down") -> key
        self._prefix = "model."
        for key in key_to_file:
            m = _EXPERT_RE.match(key)
            if m is None:
                continue
            self._prefix, layer = m["prefix"], int(m["layer"])
            if m["fused"]:
                self._fused[(layer, "gate_up" if m["fused"] == "gate_up_proj" else "down")] = key
            else:
                self._per_expert[(layer, int(m["expert"]), _ROLE[m["proj"]])] = key
        self._expert_layers = {k[0] for k in self._fused} | {k[0] for k in self._per_expert}
        log.info("checkpoint %s: %d files, %d tensors, %d layers with routed experts (%s layout)",
                 path, len(self.files), len(key_to_file), len(self._expert_layers),
                 "fused" if self._fused else "per-expert" if self._per_expert else "no expert")

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist or is not a directory; "
                                  "expected a local directory of *.safetensors files")
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index "
                                      f"(expected JSON with a 'weight_map' of key -> file name): {e}") from e
            files = [path / n for n in names]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index} names file {f.name}, which does not exist in {path}")
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"checkpoint directory {path} contains no *.safetensors files "
                                      f"(and no {INDEX_FILE}); expected a safetensors checkpoint")
        handles: dict[Path, Any] = {}
        key_to_file: dict[str, Path] = {}
        for f in files:
            try:
                handles[f] = h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read safetensors file {f} (corrupt or truncated?): {e}") from e
            for k in keys:
                if k in key_to_file:
                    raise CheckpointError(f"tensor {k!r} is in both {key_to_file[k]} and {f}; "
                                          f"expected each key in exactly one file (add {INDEX_FILE}?)")
                key_to_file[k] = f
        return cls(path, handles, key_to_file, _tied_embeddings(path / "config.json"))

    def has_experts(self, layer: int) -> bool:
        """Whether decoder layer `layer` has routed experts in this checkpoint."""
        return layer in self._expert_layers

    def non_expert_state_dict(self, model_keys: set[str], device: str | torch.device,
                              dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors for every key of `model_keys` (floating ones converted to `dtype`) on `device`."""
        found: dict[str, str] = {}
        missing: list[str] = []
        for key in sorted(model_keys):
            name = next((c for c in self._candidates(key) if c in self._key_to_file), None)
            if name is None:
                missing.append(key)
            else:
                found[key] = name
        if missing:
            raise CheckpointError(
                f"{len(missing)} model tensor(s) not found in checkpoint {self.path} "
                f"(also tried legacy block_sparse_moe.* names): {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}; files searched: {self._file_names()}")
        used = set(found.values())
        unexpected = [k for k in self._key_to_file if k not in used and not _EXPERT_RE.match(k)]
        if unexpected:
            log.debug("checkpoint %s: %d non-expert tensors not used by the model: %s",
                      self.path, len(unexpected), unexpected[:20])
        out: dict[str, torch.Tensor] = {}
        for key, name in found.items():
            t = self._handles[self._key_to_file[name]].get_tensor(name)
            out[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return out

    def check_experts(self, layers: list[int], num_experts: int) -> None:
        """Fail before any expert is read if one of `layers` x `num_experts` has no tensors."""
        for layer in layers:
            if (layer, "gate_up") in self._fused and (layer, "down") in self._fused:
                continue
            for expert in range(num_experts):
                if any((layer, expert, r) not in self._per_expert for r in ("gate", "up", "down")):
                    raise self._missing_expert(layer, expert)

    def check_model(self, model: torch.nn.Module, layout: Any) -> None:
        """Fail before any weight is read if a tensor's shape differs from the model built from
        config.json: every non-expert tensor the model has, and every MoE layer's expert tensors
        (expert count, hidden and intermediate sizes). Shapes come from the file headers only."""
        for key, param in model.state_dict().items():
            name = next((c for c in self._candidates(key) if c in self._key_to_file), None)
            if name is not None:
                self._check_tensor(name, list(self._slice(name).get_shape()), list(param.shape), f"model tensor {key!r}")
        layers = set(layout.moe_layers)
        extra = sorted(self._expert_layers - layers)
        if extra:
            raise CheckpointError(f"checkpoint {self.path} has routed experts in decoder layers {extra}, but the model "
                                  f"built from its config.json has MoE layers {sorted(layers)} (num_hidden_layers or the "
                                  "MoE layer pattern in config.json does not match the tensors)")
        h, i, e = layout.hidden_size, layout.intermediate_size, layout.num_experts
        for layer in layout.moe_layers:
            fused = {r: self._fused.get((layer, r)) for r in ("gate_up", "down")}
            if None not in fused.values():
                self._check_tensor(fused["gate_up"], list(self._slice(fused["gate_up"]).get_shape()), [e, 2 * i, h],
                                   f"layer {layer} experts (num_local_experts={e}, hidden_size={h}, intermediate={i})")
                self._check_tensor(fused["down"], list(self._slice(fused["down"]).get_shape()), [e, h, i],
                                   f"layer {layer} experts (num_local_experts={e}, hidden_size={h}, intermediate={i})")
                continue
            found = sorted({k[1] for k in self._per_expert if k[0] == layer})
            if found and found[-1] >= e:
                raise CheckpointError(f"checkpoint {self.path} layer {layer} holds experts 0..{found[-1]} but config.json "
                                      f"says {e} experts per layer (num_local_experts / num_experts)")
            for expert in range(e):
                for role, want in (("gate", [i, h]), ("up", [i, h]), ("down", [h, i])):
                    key = self._per_expert.get((layer, expert, role))
                    if key is None:
                        raise self._missing_expert(layer, expert)
                    self._check_tensor(key, list(self._slice(key).get_shape()), want,
                                       f"layer {layer} expert {expert} (hidden_size={h}, intermediate={i})")

    def _check_tensor(self, key: str, shape: list[int], want: list[int], what: str) -> None:
        if shape != want:
            raise CheckpointError(f"tensor {key!r} in {self._key_to_file[key].name} has shape {shape}, but {what} built "
                                  f"from {self.path / 'config.json'} expects {want}: config.json does not match the "
                                  "checkpoint's tensors")

    def read_expert(self, layer: int, expert: int, gate_up_out: torch.Tensor, down_out: torch.Tensor) -> None:
        """Copies expert `expert` of layer `layer` into `gate_up_out [2I, H]` and `down_out [H, I]`."""
        gu_key, down_key = self._fused.get((layer, "gate_up")), self._fused.get((layer, "down"))
        if gu_key is not None and down_key is not None:
            for key, out in ((gu_key, gate_up_out), (down_key, down_out)):
                sl = self._slice(key)
                shape = list(sl.get_shape())
                if not 0 <= expert < shape[0]:
                    raise CheckpointError(f"layer {layer} expert {expert}: out of range, {key!r} in "
                                          f"{self._key_to_file[key].name} holds experts 0..{shape[0] - 1}")
                self._check_shape(layer, expert, key, shape[1:], out)
                out.copy_(sl[expert])
            return
        keys = {r: self._per_expert.get((layer, expert, r)) for r in ("gate", "up", "down")}
        if gu_key is not None or down_key is not None or None in keys.values():
            raise self._missing_expert(layer, expert)
        rows = gate_up_out.shape[0] // 2
        self._check_shape(layer, expert, keys["gate"], self._slice(keys["gate"]).get_shape(), gate_up_out[:rows])
        self._check_shape(layer, expert, keys["up"], self._slice(keys["up"]).get_shape(), gate_up_out[rows:])
        self._check_shape(layer, expert, keys["down"], self._slice(keys["down"]).get_shape(), down_out)
        gate_up_out[:rows].copy_(self._tensor(keys["gate"]))
        gate_up_out[rows:].copy_(self._tensor(keys["up"]))
        down_out.copy_(self._tensor(keys["down"]))

    # -- helpers -------------------------------------------------------------------------------

    def _candidates(self, key: str) -> list[str]:
        """Checkpoint names that may hold model key `key`, in order of preference."""
        out = [key]
        if _MLP_RE.search(key):
            legacy = _MLP_RE.sub(r"\1block_sparse_moe.", key, count=1)
            out.append(legacy)
            if legacy.endswith(".block_sparse_moe.router.weight"):  # PhiMoE: router was called gate
                out.append(legacy[: -len("router.weight")] + "gate.weight")
        if key == "lm_head.weight" and self.tie_word_embeddings:
            out.append("model.embed_tokens.weight")
        return out

    def _slice(self, key: str) -> Any:
        return self._handles[self._key_to_file[key]].get_slice(key)

    def _tensor(self, key: str) -> torch.Tensor:
        return self._handles[self._key_to_file[key]].get_tensor(key)

    def _check_shape(self, layer: int, expert: int, key: str, shape: Any, out: torch.Tensor) -> None:
        if list(shape) != list(out.shape):
            raise CheckpointError(f"layer {layer} expert {expert}: {key!r} in {self._key_to_file[key].name} "
                                  f"has shape {list(shape)} but the output buffer expects {list(out.shape)}")

    def _missing_expert(self, layer: int, expert: int) -> CheckpointError:
        p = f"{self._prefix}layers.{layer}"
        found = [self._fused.get((layer, r)) for r in ("gate_up", "down")]
        found += [self._per_expert.get((layer, expert, r)) for r in ("gate", "up", "down")]
        return CheckpointError(
            f"layer {layer} expert {expert}: expert tensors missing from checkpoint {self.path}; expected "
            f"either fused {p}.mlp.experts.gate_up_proj and {p}.mlp.experts.down_proj, or per-expert "
            f"{p}.mlp.experts.{expert}.{{gate_proj,up_proj,down_proj}}.weight or "
            f"{p}.block_sparse_moe.experts.{expert}.{{w1,w3,w2}}.weight; found: "
            f"{[k for k in found if k is not None]}; files searched: {self._file_names()}")

    def _file_names(self) -> list[str]:
        return [f.name for f in self.files]


def _tied_embeddings(config: Path) -> bool:
    """config.json's tie_word_embeddings (top level or text_config); False when absent or unreadable."""
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
