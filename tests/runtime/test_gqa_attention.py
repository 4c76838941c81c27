"""Grouped-query attention with the query heads folded into the query length equals transformers' SDPA with
repeated keys and values; on CPU the registered `spmoe_sdpa` is transformers' own function, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from spmoe.runtime.gqa_attention import folded_attention, spmoe_sdpa_forward
from spmoe.runtime.static_cache import causal_mask


class _Attn(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


def _inputs(t: int, heads: int = 8, kv_heads: int = 2, c: int = 40, d: int = 16, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(1, t, heads, d, generator=gen).transpose(1, 2)  # [1, H, T, D], strided as transformers makes it
    k, v = (torch.randn(1, kv_heads, c, d, generator=gen) for _ in range(2))  # [1, KVH, C, D]
    start = c - t - 5  # the last 5 positions are beyond the sequence: masked
    mask = causal_mask(torch.arange(start, start + t), torch.arange(c), "sdpa", dtype)  # [1, 1, T, C]
    return [x.to(device, dtype) for x in (q, k, v)] + [mask.to(device)]


@pytest.mark.parametrize("t", [1, 2, 5])
def test_folded_equals_repeated_keys_and_values(t):
    q, k, v, mask = _inputs(t)
    stock, _ = sdpa_attention_forward(_Attn(4), q, k, v, mask, scaling=0.25)  # [1, T, H, D]
    torch.testing.assert_close(folded_attention(q, k, v, mask, 0.25), stock, rtol=1e-5, atol=1e-6)


def test_folded_keeps_a_value_width_other_than_the_keys():
    q, k, v, mask = _inputs(3)
    v = torch.cat([v, v[..., :4]], dim=-1)  # [1, KVH, C, 20]: values wider than queries and keys
    stock, _ = sdpa_attention_forward(_Attn(4), q, k, v, mask, scaling=0.25)  # [1, T, H, 20]
    torch.testing.assert_close(folded_attention(q, k, v, mask, 0.25), stock, rtol=1e-5, atol=1e-6)


def test_folding_keeps_each_query_rows_mask():
    q, k, v, mask = _inputs(3)
    moved = mask.clone()
    moved[..., 0, :] = False  # the first query sees nothing but its own first key
    moved[..., 0, 0] = True
    out = folded_attention(q, k, v, moved, 0.25)  # [1, T, H, D]
    torch.testing.assert_close(out[0, 0], v[0, :, 0].repeat_interleave(4, dim=0))  # every head of row 0: value 0
    torch.testing.assert_close(out[0, 1:], folded_attention(q, k, v, mask, 0.25)[0, 1:])


def test_registered_function_is_transformers_own_on_cpu():
    q, k, v, mask = _inputs(2)
    ours, _ = spmoe_sdpa_forward(_Attn(4), q, k, v, mask, scaling=0.25)
    stock, _ = sdpa_attention_forward(_Attn(4), q, k, v, mask, scaling=0.25)
    assert torch.equal(ours, stock)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 3, 5])
def test_folded_on_cuda_matches_within_bf16_rounding(gpu, t):
    q, k, v, mask = _inputs(t, heads=32, kv_heads=8, c=300, d=128, dtype=torch.bfloat16, device=gpu)
    ours, _ = spmoe_sdpa_forward(_Attn(4), q, k, v, mask, scaling=128 ** -0.5)
    stock, _ = sdpa_attention_forward(_Attn(4), q, k, v, mask, scaling=128 ** -0.5)
    torch.testing.assert_close(ours, stock, rtol=1.6e-2, atol=1e-2)  # bf16: one ulp of either rounding
    torch.cuda.synchronize()


def test_session_with_folded_attention_decodes_the_same_tokens_on_cpu():
    from dataclasses import replace

    from conftest import tiny_run_config
    from spmoe.config import MethodConfig
    from spmoe.session import open_session

    tokens = {}
    for attention in ("sdpa", "spmoe_sdpa"):
        cfg = tiny_run_config(num_prompts=1, max_new_tokens=6)
        cfg.hardware = replace(cfg.hardware, attention=attention, decode="static")
        s = open_session(cfg)
        try:
            assert s.target.model.config._attn_implementation == attention
            tokens[attention] = s.generate(MethodConfig(name="lru_nosd"), cfg.hardware, 6)[0][0].token_ids
        finally:
            s.close()
    assert tokens["sdpa"] == tokens["spmoe_sdpa"]


def test_unknown_attention_is_refused_with_the_valid_ones():
    from conftest import tiny_run_config
    from spmoe.validate import validate_config

    cfg = tiny_run_config()
    cfg.hardware.attention = "flash"
    with pytest.raises(ValueError, match="hardware.attention.*flash.*sdpa, spmoe_sdpa"):
        validate_config(cfg)
