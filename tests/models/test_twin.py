"""Twinned pairs: a target upcycled from its draft computes the draft's function at zero noise,
and the noise knob moves acceptance and draft-target agreement."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.config import MethodConfig, SpecConfig, TwinConfig
from spmoe.methods import get_strategy
from spmoe.strategy import MethodContext


def _twin_session(noise: float, model="tiny", draft="tiny", **kw):
    cfg = tiny_run_config(model, num_prompts=2, max_new_tokens=24, **kw)
    cfg.model.weights = "twin"
    cfg.model.twin = TwinConfig(expert_noise=noise)
    cfg.draft = load_preset("draft", draft)
    return open_session(cfg)


@torch.inference_mode()
def assert_target_computes_the_draft(s) -> None:
    """The session's target (gpu_resident) and draft give the same logits on its first prompt; closes `s`."""
    try:
        ctx = MethodContext(s.cfg, s.target, s.device, s.plan(s.cfg.hardware, "gpu_resident"))
        runtime = get_strategy("gpu_resident").build(ctx)
        ids = torch.tensor([s.prompts[0].token_ids])
        target_logits = runtime.model(input_ids=ids).logits
        draft_logits = s.draft(input_ids=ids).logits
        runtime.close()
        torch.testing.assert_close(target_logits, draft_logits, rtol=1e-4, atol=1e-4)
    finally:
        s.close()


def acceptance(s) -> float:
    """gpu_resident_sd's acceptance per drafted token at k = 3 over the session's prompts; closes `s`."""
    try:
        gens, _, _ = s.generate(MethodConfig(name="gpu_resident_sd"), s.cfg.hardware, 24,
                                spec_cfg=SpecConfig(num_draft_tokens=3))
        recs = [r for g in gens for r in g.records if r.num_drafted]
        return sum(r.num_accepted for r in recs) / sum(r.num_drafted for r in recs)
    finally:
        s.close()


def test_zero_noise_target_equals_draft():
    assert_target_computes_the_draft(_twin_session(0.0))


def test_noise_lowers_acceptance():
    exact, noisy = acceptance(_twin_session(0.0)), acceptance(_twin_session(1.0))
    assert exact > 0.95
    assert noisy < exact


def test_not_twinnable_names_the_mismatch():
    with pytest.raises(ValueError, match="hidden_size: target 64 vs draft 48"):
        _twin_session(0.1, draft="tiny_qwen3")


def test_twin_needs_a_draft():
    cfg = tiny_run_config("tiny")
    cfg.model.weights = "twin"
    with pytest.raises(ValueError, match="pass draft=<name>"):
        open_session(cfg)


def test_vocabulary_mismatch_fails_with_both_sizes():
    cfg = tiny_run_config("tiny", method="lru")
    cfg.draft = load_preset("draft", "tiny", hf_config={**load_preset("draft", "tiny").hf_config, "vocab_size": 256})
    with pytest.raises(ValueError, match="vocabulary size 256 but the target has 512"):
        open_session(cfg)


def test_sd_method_without_draft_fails():
    with pytest.raises(ValueError, match="needs a draft model"):
        open_session(tiny_run_config("tiny", method="lru"))


_TINY_PHI = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1.0e-05)


def _grown_session(noise: float, draft_width: int = 16, target_width: int = 48, **draft_over):
    """A tiny Phi-3.5-MoE-shaped target (expert width 48) grown from a tiny Phi-mini-MoE-shaped sparse draft."""
    cfg = tiny_run_config("tiny", num_prompts=2, max_new_tokens=24)
    cfg.model = load_preset("model", "phimoe", hf_config={**_TINY_PHI, "intermediate_size": target_width}, weights="twin",
                            twin=TwinConfig(expert_noise=noise))
    cfg.model.dtype = "float32"
    cfg.draft = load_preset("draft", "phi_mini_moe_twin",
                            hf_config={**_TINY_PHI, "intermediate_size": draft_width, **draft_over})
    cfg.draft.dtype = "float32"
    return open_session(cfg)


@torch.inference_mode()
def test_zero_noise_grown_target_equals_its_sparse_draft():
    s = _grown_session(0.0)
    router_t, router_d = s.target.model.model.layers[1].mlp.router.weight, s.draft.model.layers[1].mlp.router.weight
    torch.testing.assert_close(router_t, router_d)  # routing is the draft's
    assert_target_computes_the_draft(s)


def test_grown_twin_noise_lowers_acceptance():
    exact, noisy = acceptance(_grown_session(0.0)), acceptance(_grown_session(2.0))
    assert exact > 0.95
    assert noisy < exact


@pytest.mark.parametrize("width, over, message", [
    (64, {}, "expert width 48 vs a wider draft expert \\(64\\)"),
    (16, {"num_local_experts": 8}, "experts per layer: target 4 vs draft 8"),
    (16, {"num_attention_heads": 2, "num_key_value_heads": 1}, "num_attention_heads: target 4 vs draft 2"),
])
def test_grown_twin_names_the_mismatch(width, over, message):
    with pytest.raises(ValueError, match=message):
        _grown_session(0.1, draft_width=width, **over)


@torch.inference_mode()
def _expert_divergence(target_width: int, noise: float = 0.2) -> float:
    """RMS of (grown expert - its draft expert) over RMS of the draft expert, on random inputs, over every expert
    of every layer (silu-gated FFNs, as Phi's)."""
    s = _grown_session(noise, target_width=target_width)
    try:
        layout, gen = s.target.layout, torch.Generator().manual_seed(0)
        x = torch.randn(256, _TINY_PHI["hidden_size"], generator=gen)  # [N, H]

        def ffn(gate_up, down):  # gate_up [2I, H], down [H, I]
            gate, up = (x @ gate_up.T).chunk(2, dim=-1)  # [N, I] each
            return (torch.nn.functional.silu(gate) * up) @ down.T  # [N, H]

        diff = ref = 0.0
        for layer in layout.moe_layers:
            experts = s.draft.model.layers[layer].mlp.experts
            for e in range(layout.num_experts):
                draft_out = ffn(experts.gate_up_proj[e].float(), experts.down_proj[e].float())
                target_out = ffn(*(t.float() for t in layout.split(s.target.store.flat((layer, e)))))
                diff += (target_out - draft_out).pow(2).sum().item()
                ref += draft_out.pow(2).sum().item()
        return (diff / ref) ** 0.5
    finally:
        s.close()


def test_grown_twin_divergence_is_set_by_noise_not_by_growth():
    # 3x and 10x growth diverge alike; before the added down columns were scaled by sqrt(I_d / (I_t - I_d)),
    # 10x growth diverged about 1.6x more than 3x at the same noise
    small, large = _expert_divergence(48), _expert_divergence(160)
    assert 0.05 < small < 0.6
    assert 0.8 < large / small < 1.25
