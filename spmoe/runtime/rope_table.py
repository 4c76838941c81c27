"""
Rotary tables: a model's rotary embedding served by indexing cos/sin tables on the device, for the
families whose stock rotary forward computes its inverse frequencies on the host at every call
(`HOST_ROPE_MODEL_TYPES`: Phi-3.5-MoE's `PhimoeRotaryEmbedding` calls its init function without a
device and copies the result over, a pageable copy that CUDA graph capture refuses, so such a model
would decode eagerly; it is also host work on every step).

Terms: P, the table's positions (a static cache's capacity); D, the rotary width. `install(model, P)`
builds the tables by running the stock forward once, eagerly, at positions 0..P-1, and makes the
rotary module's forward index them while a CUDA graph is being captured (outside capture it runs the
stock forward, so eager steps and callers past P are served as before). Row p of the stock output at
positions 0..P-1 is the stock output at position p whenever the stock forward would pick the same
frequencies, so the tables give the stock values bit for bit. Longrope picks its long frequencies
once the sequence passes `original_max_position_embeddings` (O); where P > O a second table built at
positions 0..O-1 holds the short ones, and the forward picks between them on the device (no host
sync).

Invariants: tables only grow; a table a captured graph may read is never freed (the module keeps
every table it built), so graphs captured against an older, smaller table stay valid for the
positions they were captured for.
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn

HOST_ROPE_MODEL_TYPES = frozenset({"phimoe"})


def needs_table(model: nn.Module) -> bool:
    """Whether `model`'s rotary forward builds its frequencies on the host (and so needs tables to be captured)."""
    return model.config.model_type in HOST_ROPE_MODEL_TYPES and _rotary(model) is not None


def install(model: nn.Module, num_positions: int) -> None:
    """Serve `model`'s rotary embedding from tables of at least `num_positions` positions (no-op where not
    `needs_table` or where its tables are already that long)."""
    if not needs_table(model):
        return
    rotary = _rotary(model)
    table = getattr(rotary, "_spmoe_rope_table", None)
    if table is not None and table.num_positions >= num_positions:
        return
    stock = table.stock if table is not None else rotary.forward
    new = RopeTable(stock, rotary, model.get_input_embeddings().weight, num_positions)
    new.retired = [] if table is None else [*table.retired, table]
    rotary._spmoe_rope_table = new
    rotary.forward = MethodType(_forward, rotary)


def _forward(rotary: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    table = rotary._spmoe_rope_table
    return table(x, position_ids) if capturing(x) else table.stock(x, position_ids)


def capturing(x: torch.Tensor) -> bool:
    """Whether `x`'s forward is being captured into a CUDA graph (the tables serve it then)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _rotary(model: nn.Module) -> nn.Module | None:
    return getattr(model.base_model, "rotary_emb", None)


class RopeTable:
    """cos/sin [P, D] of one rotary module at positions 0..P-1 (and the short ones [O, D] for longrope with P > O),
    and the stock forward they were built with; called like the rotary module."""

    def __init__(self, stock, rotary: nn.Module, like: torch.Tensor, num_positions: int):
        self.stock = stock  # the rotary module's own bound forward
        self.num_positions = num_positions
        self.retired: list[RopeTable] = []
        params = rotary.config.rope_parameters or {}
        self.short_positions = (params.get("original_max_position_embeddings")
                                if params.get("rope_type") == "longrope" else None)  # O, or None
        self.cos, self.sin = self._build(like, num_positions)  # [P, D]
        if self.short_positions is not None and num_positions > self.short_positions:
            self.short_cos, self.short_sin = self._build(like, self.short_positions)  # [O, D]
        else:
            self.short_positions = None

    @torch.no_grad()
    def _build(self, like: torch.Tensor, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = like.new_empty(1, 1, 1)  # the stock forward reads only its device and dtype
        positions = torch.arange(num_positions, device=like.device)[None]  # [1, P]
        cos, sin = self.stock(x, positions)
        return cos[0], sin[0]  # [P, D]

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos[position_ids], self.sin[position_ids]  # [B, T, D]
        if self.short_positions is not None:
            long = position_ids.max() >= self.short_positions  # [] on the device
            short = position_ids.clamp(max=self.short_positions - 1)  # [B, T]
            cos = torch.where(long, cos, self.short_cos[short])
            sin = torch.where(long, sin, self.short_sin[short])
        return cos.to(x.dtype), sin.to(x.dtype)
