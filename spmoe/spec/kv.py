"""
KV-cache rollback after verification, and the cache keyword across transformers versions.

`crop_to(kv, n)` keeps the first n positions of a transformers cache. It passes a negative count
(tokens to remove), the one form both transformers 5.17 (absolute length, negative = remove)
and 5.2x (negative only) accept.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers import Cache


def cache_kwarg(model: nn.Module) -> str:
    """The forward keyword of the KV cache: transformers >= 5.2x renamed `past_key_values` to
    `cache` (the GPU image has 5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def crop_to(kv: Cache, length: int) -> None:
    excess = kv.get_seq_length() - length
    if excess < 0:
        raise ValueError(f"cannot crop a cache of {kv.get_seq_length()} positions to {length}")
    if excess > 0:
        kv.crop(-excess)
