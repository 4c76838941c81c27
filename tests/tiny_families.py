"""Tiny transformers configs of every supported MoE family, shared by the checkpoint and oracle tests."""

from __future__ import annotations

from transformers import (DeepseekV2Config, MixtralConfig, OlmoeConfig, PhimoeConfig, PretrainedConfig,
                          Qwen2MoeConfig, Qwen3MoeConfig)

FAMILIES = ("deepseek_v2", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe")


def tiny_hf_config(family: str, num_layers: int, num_experts: int, **attn) -> PretrainedConfig:
    """A 32-wide, 4-head `family` config with `num_layers` layers and `num_experts` routed experts (top-2);
    `attn` adds to or overrides the shared attention fields (e.g. max_position_embeddings)."""
    a = dict(vocab_size=128, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
             tie_word_embeddings=False, **attn)
    e = num_experts
    if family == "mixtral":
        return MixtralConfig(**a, intermediate_size=48, num_key_value_heads=2, num_local_experts=e, num_experts_per_tok=2)
    if family == "phimoe":
        return PhimoeConfig(**a, intermediate_size=48, num_key_value_heads=2, num_local_experts=e, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**a, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                              num_key_value_heads=2, num_experts=e, num_experts_per_tok=2, norm_topk_prob=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**a, intermediate_size=64, moe_intermediate_size=24, head_dim=8, num_key_value_heads=2,
                              num_experts=e, num_experts_per_tok=2)
    if family == "olmoe":
        return OlmoeConfig(**a, intermediate_size=24, num_key_value_heads=4, num_experts=e, num_experts_per_tok=2)
    if family == "deepseek_v2":
        return DeepseekV2Config(**a, intermediate_size=64, moe_intermediate_size=16, num_key_value_heads=4,
                                n_routed_experts=e, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    raise ValueError(f"unknown family {family!r}; valid: {list(FAMILIES)}")
