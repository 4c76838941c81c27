"""
A KV cache of fixed capacity whose writes go where the step says: the cache of `hardware.decode`
static and graphs (see `spmoe.runtime.decoder`).

transformers' `StaticCache` keeps one length counter per layer on the device and appends at it.
`PositionedCache` instead writes every layer's new keys and values at one device tensor of
positions that the step sets (`write_positions`), and keeps the length on the host. A step
feeding T tokens at length L writes positions [L, L + T) and attends with `causal_mask`: query
position p sees key j iff j <= p. So positions at or past the length are never attended, and
rolling back rejected positions after verification is `crop(n)`, a host assignment: the stale
keys beyond n are overwritten by the step that next writes them, before any query can see them.

Terms: C = capacity (positions), T = tokens a step feeds, H_kv = KV heads, D_k / D_v = key / value
head dims (they differ for DeepSeek-V2's MLA).
Invariants: keys and values [1, H_kv, C, D] are allocated at the first write and never move (a
captured CUDA graph holds their addresses); `length` <= C; the model only ever sees masks built
by `causal_mask`, never transformers' own (which would read the cache's sizes), so the cache's
mask sizes are irrelevant; full attention only (a sliding window shorter than C is refused).
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import StaticLayer

from spmoe.runtime import gqa_attention


class _PositionedLayer(StaticLayer):
    """One layer's static keys/values [1, H_kv, C, D], written at the owner's `write_positions`."""

    def __init__(self, capacity: int, owner: PositionedCache):
        super().__init__(max_cache_len=capacity)
        self._owner = owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states [1, H_kv, T, D_k], value_states [1, H_kv, T, D_v]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self._owner.write_positions, key_states)
        self.values.index_copy_(2, self._owner.write_positions, value_states)
        return self.keys, self.values  # [1, H_kv, C, D_k], [1, H_kv, C, D_v]

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_max_length(self) -> int:
        return self.max_cache_len


def sliding_window(text_config) -> int | None:
    """The attention window some layer of `text_config` applies, or None when every layer attends fully.

    `layer_types` (transformers 5) names each layer's attention; without it, `use_sliding_window` (Qwen2's flag)
    or a set `sliding_window` decides."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if not getattr(text_config, "use_sliding_window", True):
        return None
    return window


class PositionedCache(Cache):
    """A transformers `Cache` of `capacity` positions for every decoder layer of `config`."""

    def __init__(self, config, capacity: int):
        text = config.get_text_config(decoder=True)
        window = sliding_window(text)
        if window is not None and window < capacity:
            raise ValueError(f"a static KV cache serves full attention only; {text.model_type} has a sliding"
                             f" window of {window} < {capacity} positions (use hardware.decode=eager)")
        self.capacity = capacity
        self.length = 0  # positions [0, length) hold the sequence's keys and values
        self.write_positions: torch.Tensor | None = None  # [T] long, set by the step before the forward
        super().__init__(layers=[_PositionedLayer(capacity, self) for _ in range(text.num_hidden_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, length: int) -> None:
        """Keep positions [0, length); `length` may be 0 (a new sequence)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length

    def advance(self, num_tokens: int) -> None:
        """The step just wrote positions [length, length + num_tokens)."""
        if self.length + num_tokens > self.capacity:
            raise ValueError(f"{self.length} + {num_tokens} positions exceed the cache's capacity of {self.capacity}")
        self.length += num_tokens


def causal_mask(positions: torch.Tensor, key_idx: torch.Tensor, attn_implementation: str,
                dtype: torch.dtype) -> torch.Tensor:
    """The attention mask of queries at `positions` [T] over keys `key_idx` [C] = arange(C), as
    transformers' attention functions take a prepared 4D mask: sdpa (and `spmoe_sdpa`) a bool [1, 1, T, C] (True =
    attend), eager an additive float of `dtype` (0 or its minimum)."""
    allowed = key_idx[None, :] <= positions[:, None]  # [T, C]
    if attn_implementation in ("sdpa", gqa_attention.NAME):
        return allowed[None, None]
    if attn_implementation == "eager":
        blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)  # [T, C]
        return blocked.masked_fill(allowed, 0.0)[None, None]
    raise ValueError(f"static decode supports the sdpa, spmoe_sdpa and eager attention implementations, not"
                     f" {attn_implementation!r}")
