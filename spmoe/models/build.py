"""
Building the target MoE: a transformers model whose routed experts live in the ExpertStore.

The model is constructed on the `meta` device (no memory), its fused experts modules are
replaced by `OffloadedExperts`, and only then are the remaining (non-expert) weights
materialized on the compute device: seeded random (`weights=random`) or read from a local
safetensors checkpoint (`weights=checkpoint`). Experts never pass through a full-model CPU init
and are never all on the GPU: random experts are generated straight into the store, checkpoint
experts are read one expert at a time into it.

Terms: *non-expert* = every parameter that is not a routed expert (attention, norms,
embeddings, routers, shared experts, dense MLPs of dense layers).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from spmoe.config import ModelConfig, parse_dtype
from spmoe.models.experts import ExpertLayout, OffloadedExperts, find_experts, layout_of
from spmoe.offload.store import ExpertStore

log = logging.getLogger(__name__)

# keys some configs do not declare but models read with getattr (or that are folded into
# `rope_parameters` on load); accepted for every family
_READ_BY_GETATTR = {"head_dim", "rope_theta", "rope_scaling", "partial_rotary_factor"}
SUPPORTED_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "phimoe", "deepseek_v2")


@dataclass
class TargetModel:
    model: PreTrainedModel
    layout: ExpertLayout
    store: ExpertStore
    non_expert_bytes: int
    weights: str  # random | checkpoint

    @property
    def act_fn(self) -> torch.nn.Module:
        """The routed experts' activation (every MoE layer's is the same)."""
        return self.model.model.layers[self.layout.moe_layers[0]].mlp.experts.act_fn


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    if cfg.weights == "checkpoint":
        from spmoe.models.checkpoint import CheckpointError

        if not cfg.path:
            raise CheckpointError("model.weights=checkpoint needs model.path=<a local checkpoint directory>")
        config_file = Path(cfg.path) / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"checkpoint config not found: {config_file} (model.path must be a directory"
                                  " with config.json and *.safetensors)")
        hf_cfg = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    elif cfg.weights in ("random", "twin"):
        if cfg.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unknown model family {cfg.family!r}; valid: {list(SUPPORTED_FAMILIES)}")
        hf_cfg = AutoConfig.for_model(cfg.family, **cfg.hf_config)
        known = _config_keys(type(hf_cfg))
        unknown = sorted(k for k in cfg.hf_config if k not in known)
        if unknown:
            raise ValueError(f"model.hf_config has keys that {cfg.family} configs do not know: {unknown}"
                             f" (valid: {sorted(known)})")
    else:
        raise ValueError(f"unknown model.weights {cfg.weights!r}; valid: random, checkpoint, twin")
    if hf_cfg.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"model type {hf_cfg.model_type!r} is not supported; valid: {list(SUPPORTED_FAMILIES)}")
    return hf_cfg


def _config_keys(cls: type) -> set[str]:
    """Every key a transformers config class accepts: its fields, init args and attribute aliases."""
    keys = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {})) | _READ_BY_GETATTR
    for klass in cls.__mro__:
        keys |= set(getattr(klass, "__annotations__", {}))
        init = klass.__dict__.get("__init__")
        if init is not None:
            keys |= set(inspect.signature(init).parameters) - {"self", "kwargs"}
    return keys


def skeleton(hf_cfg: PretrainedConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, ExpertLayout]:
    """The model on `meta`, experts replaced by provider-less `OffloadedExperts`."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    layout = layout_of(model, dtype)
    for idx, experts in find_experts(model).items():
        model.model.layers[idx].mlp.experts = OffloadedExperts(idx, layout, experts.act_fn, provider=None)
    model.eval()
    return model, layout


def param_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def materialize(model: PreTrainedModel, cfg: ModelConfig, device: torch.device, seed: int) -> None:
    """Allocate the non-expert weights on `device` and fill them (seeded random or checkpoint)."""
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()  # also recomputes non-persistent buffers (rotary inv_freq)
    if cfg.weights == "checkpoint":
        from spmoe.models.checkpoint import Checkpoint

        ckpt = Checkpoint.open(cfg.path)
        state = ckpt.non_expert_state_dict(set(model.state_dict()), device, parse_dtype(cfg.dtype))
        model.load_state_dict(state, strict=False)
        model.tie_weights()


def fill_store(store: ExpertStore, cfg: ModelConfig, device: torch.device, seed: int, std: float) -> None:
    t0 = time.perf_counter()
    if cfg.weights == "checkpoint":
        from spmoe.models.checkpoint import Checkpoint

        ckpt = Checkpoint.open(cfg.path)
        store.fill(lambda key, gate_up, down: ckpt.read_expert(key[0], key[1], gate_up, down))
    else:
        store.fill_random(seed + 1, std, device)
    log.info("filled expert store (%s) in %.1f s", cfg.weights, time.perf_counter() - t0)


def build_target(cfg: ModelConfig, device: torch.device, seed: int) -> TargetModel:
    """Skeleton -> non-expert weights on `device` -> expert store (pinned on CUDA)."""
    hf_cfg = hf_config(cfg)
    model, layout = skeleton(hf_cfg, parse_dtype(cfg.dtype))
    non_expert = param_bytes(model)
    materialize(model, cfg, device, seed)
    store = ExpertStore(layout, pin=device.type == "cuda")
    fill_store(store, cfg, device, seed, std=getattr(hf_cfg, "initializer_range", 0.02))
    return TargetModel(model, layout, store, non_expert, cfg.weights)
