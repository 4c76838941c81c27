"""
The real pair's target: a MixtralForCausalLM upcycled from the draft's dense FFNs.

Terms: the target is a *twin* of the draft -- same attention, norms, embeddings, head, RoPE and
depth (or its first `len(routers)` layers) -- whose layer-l MoE has E *experts*, each a copy of the
draft's dense FFN l with its neurons' down-projection columns rescaled by
(1 + expert_noise * z_e), z_e ~ N(0, 1), and whose gate is the fitted router of layer l.
Invariants: `build_target` raises on any shared-hyperparameter mismatch with the draft; the
neuron noise is seeded (seed * 1000 + 7), so the same draft, routers and config give bit-identical
weights; with expert_noise = 0 every MoE layer computes the dense FFN (up to rounding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spmoe.models.real_pair import PairConfig


def mixtral_config(draft_cfg, cfg: PairConfig, num_layers: int | None = None):
    from transformers import MixtralConfig

    d = draft_cfg
    return MixtralConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=num_layers or d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, head_dim=getattr(d, "head_dim", None),
        hidden_act=d.hidden_act, max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps, rope_parameters=dict(d.rope_parameters),
        tie_word_embeddings=d.tie_word_embeddings, sliding_window=None,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0,
        output_router_logits=False, bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id, initializer_range=d.initializer_range,
    )


@torch.no_grad()
def build_target(draft, routers: dict[int, torch.Tensor], cfg: PairConfig):
    """MixtralForCausalLM: the draft's shared weights, experts = neuron-rescaled FFN copies,
    routers = `routers`."""
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    n_layers = len(routers)
    mcfg = mixtral_config(draft.config, cfg, n_layers)
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act",
              "vocab_size", "tie_word_embeddings", "rope_parameters", "max_position_embeddings"):
        if getattr(mcfg, k) != getattr(draft.config, k):
            raise ValueError(f"twin mismatch on {k}: {getattr(mcfg, k)} vs {getattr(draft.config, k)}")
    with no_init_weights():
        target = MixtralForCausalLM(mcfg)
    target.eval()
    tstate = target.state_dict()
    for name, t in draft.state_dict().items():
        if ".mlp." in name:
            continue
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= n_layers:
            continue
        tstate[name].copy_(t)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7)
    for l in range(n_layers):
        mlp = draft.model.layers[l].mlp
        moe = target.model.layers[l].mlp
        moe.gate.weight.copy_(routers[l])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for e in range(cfg.num_experts):
            scale = 1 + cfg.expert_noise * torch.randn(mcfg.intermediate_size, generator=gen)
            moe.experts.gate_up_proj[e].copy_(gate_up)
            moe.experts.down_proj[e].copy_(mlp.down_proj.weight * scale[None, :])
    target.tie_weights()
    return target
