"""
Draft models: any transformers causal LM sharing the target's vocabulary, kept entirely on the
device (no offloading) and counted against the GPU budget.

Random weights are materialized straight on the device (built on `meta`, then `to_empty` and
seeded `init_weights`), so a Mistral-7B-shape draft never passes through host memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from spmoe.config import DraftConfig, parse_dtype


def draft_hf_config(cfg: DraftConfig) -> PretrainedConfig:
    if cfg.weights == "checkpoint":
        if not cfg.path or not (Path(cfg.path) / "config.json").is_file():
            raise ValueError(f"draft.weights=checkpoint needs draft.path=<directory with config.json>, got {cfg.path!r}")
        return AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    if cfg.weights != "random":
        raise ValueError(f"unknown draft.weights {cfg.weights!r}; valid: random, checkpoint")
    try:
        return AutoConfig.for_model(cfg.family, **cfg.hf_config)
    except ValueError as exc:
        raise ValueError(f"unknown draft family {cfg.family!r} (a transformers model_type, e.g. llama, mistral, qwen3)") from exc


def check_vocab(target_cfg: PretrainedConfig, draft_cfg: PretrainedConfig, draft_name: str) -> None:
    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise ValueError(f"draft {draft_name!r} has vocabulary size {draft_cfg.vocab_size} but the target has"
                         f" {target_cfg.vocab_size}: speculative decoding needs the same vocabulary")


def build_draft(cfg: DraftConfig, hf_cfg: PretrainedConfig, device: torch.device, seed: int) -> PreTrainedModel:
    dtype = parse_dtype(cfg.dtype)
    if cfg.weights == "checkpoint":
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, local_files_only=True).to(device)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
        model.to_empty(device=device)
        torch.manual_seed(seed)
        model.init_weights()
    return model.eval()
