"""
Grouped-query attention that reads the grouped keys and values in place, on CUDA.

Terms: H query heads, KVH key/value heads, G = H / KVH query heads per key/value head (query head h reads
key/value head h // G), T query positions, C key positions (the static cache's capacity).

transformers' SDPA attention, given an explicit mask (which the static decode always passes, see
`spmoe.runtime.static_cache.causal_mask`), expands keys and values to every query head (`repeat_kv`: two
[1, H, C, D] copies per layer and step) before calling `scaled_dot_product_attention`. Inside a captured step
those copies are graph-pool memory, and every precaptured width holds its own. Here the G query heads of one
key/value head are folded into the query length instead: queries [B, H, T, D] -> [B, KVH, G T, D], the mask
[B, 1, T, C] -> [B, 1, G T, C] (each query row keeps its own mask row), one SDPA call over the unexpanded keys
and values [B, KVH, C, D], and the output unfolded back. Each query row's scores, softmax and weighted sum are over the
same keys and values as with the expansion; what may differ is the kernel's tiling, hence rounding (bf16:
within the lossless check's tolerance; tests compare both).

Registered as the attention implementation `spmoe_sdpa` (with transformers' SDPA mask function) and chosen
session-wide by `hardware.attention` (`select`: the default `spmoe_sdpa`, or `sdpa`, transformers' own); on
other devices, without groups, without a mask, or with a per-head mask it is transformers'
`sdpa_attention_forward` unchanged, so CPU runs stay bit-identical to transformers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "spmoe_sdpa"


def folded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scaling: float | None) -> torch.Tensor:
    """Attention of query [B, H, T, D] over key, value [B, KVH, C, D] under a bool mask [B or 1, 1, T, C]
    (True = attend), with each key/value head's G query heads folded into the query length: [B, T, H, D]."""
    b, h, t, d = query.shape
    kvh = key.shape[1]
    g = h // kvh
    q = query.reshape(b, kvh, g * t, d)  # [B, KVH, G T, D]: head kvh * G + j, row j T + i
    mb, c = mask.shape[0], mask.shape[-1]
    m = mask[:, :, None].expand(mb, 1, g, t, c).reshape(mb, 1, g * t, c)  # [B, 1, G T, C]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=m, scale=scaling)  # [B, KVH, G T, D]
    return out.reshape(b, h, t, value.shape[-1]).transpose(1, 2).contiguous()  # [B, T, H, Dv]


def spmoe_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (output [B, T, H, D], no weights)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (not query.is_cuda or groups == 1 or attention_mask is None or attention_mask.dtype != torch.bool
            or attention_mask.shape[1] != 1 or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return folded_attention(query, key, value, attention_mask, scaling), None


AttentionInterface.register(NAME, spmoe_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def select(model: torch.nn.Module, name: str) -> None:
    """Make `model`'s attention layers use implementation `name` (`sdpa` or NAME; validated with the config)."""
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
