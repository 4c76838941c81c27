"""
Decoders: a model's forward over its own KV cache, the one seam between the engine (or the
drafter) and the cache. `hardware.decode` picks one for the target and the draft alike:

- `eager`: transformers' `DynamicCache`, grown per step and cropped after a rejection;
- `static`: a `PositionedCache` of fixed capacity (`spmoe.runtime.static_cache`); every forward
  has static shapes for its T, and rollback moves the host length pointer;
- `graphs`: `static`, and each decode forward of T <= `max_graph_tokens` tokens is replayed from a
  CUDA graph captured at its first use (`spmoe.runtime.graphs`), where the model is capturable
  (on CUDA, no hooks, experts served without a host sync); elsewhere it runs as `static`.

Interface (both classes): `begin(max_len)` starts a sequence that will hold at most `max_len`
positions; `forward(ids, num_logits)` feeds `ids` after the cached positions and returns the logits of
the last `num_logits` [num_logits, V] (on the device, the model's dtype; a graph's output stays
valid until the decoder's next forward); `crop(n)` keeps the first n positions; `length` is the
number of cached positions. Prefill (the first forward of a sequence) always runs eagerly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import DynamicCache

from spmoe.runtime.graphs import StepGraph, capturable
from spmoe.runtime.static_cache import PositionedCache, causal_mask
from spmoe.spec.kv import cache_kwarg, crop_to
from spmoe.trace.records import ExpertEventLog

log = logging.getLogger(__name__)
DECODE_MODES = ("eager", "static", "graphs")
CAPACITY_QUANTUM = 64  # capacities are rounded up to this, so prompts of similar length share graphs


class DynamicDecoder:
    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self._kv_kwarg = cache_kwarg(model)
        self.kv: DynamicCache | None = None
        self.length = 0

    def begin(self, max_len: int) -> None:
        self.kv = DynamicCache(config=self.model.config)
        self.length = 0

    def forward(self, ids: list[int], num_logits: int) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=num_logits,
                         **{self._kv_kwarg: self.kv})
        self.length += len(ids)
        return out.logits[0]  # [num_logits, V]

    def crop(self, length: int) -> None:
        crop_to(self.kv, length)
        self.length = length


class StaticDecoder:
    def __init__(self, model: nn.Module, device: torch.device, graphs: bool = False, max_graph_tokens: int = 1,
                 events: ExpertEventLog | None = None):
        self.model = model
        self.device = device
        self.graphs = graphs
        self.max_graph_tokens = max_graph_tokens
        self.events = events
        self._kv_kwarg = cache_kwarg(model)
        self._attn = model.config._attn_implementation
        self.kv: PositionedCache | None = None
        self._key_idx: torch.Tensor | None = None  # [C] arange
        self._graphs: dict[tuple[int, int], StepGraph] = {}
        self._pool = None
        self._capturable: bool | None = None  # decided at the first decode forward after each allocation
        self.num_replays = 0

    @property
    def length(self) -> int:
        return self.kv.length

    def begin(self, max_len: int) -> None:
        need = max_len + self.max_graph_tokens  # the tail that graph warm-ups write (see spmoe.runtime.graphs)
        if self.kv is None or self.kv.capacity < need:
            self._allocate(-(-need // CAPACITY_QUANTUM) * CAPACITY_QUANTUM)
        self.kv.crop(0)

    def _allocate(self, capacity: int) -> None:
        self._graphs.clear()  # they hold the old cache's addresses
        self.kv = None
        self.kv = PositionedCache(self.model.config, capacity)
        self._key_idx = torch.arange(capacity, device=self.device)  # [C]
        self._pool = None
        self._capturable = None

    def step(self, inputs: torch.Tensor, num_tokens: int, num_logits: int) -> torch.Tensor:
        """One forward from device inputs [T + 1] (ids, then the start position): logits [num_logits, V].
        The eager path and every captured graph run exactly this."""
        ids = inputs[:num_tokens].view(1, num_tokens)  # [1, T]
        positions = inputs[num_tokens:] + self._key_idx[:num_tokens]  # [T]
        self.kv.write_positions = positions
        dtype = self.model.get_input_embeddings().weight.dtype
        mask = causal_mask(positions, self._key_idx, self._attn, dtype)  # [1, 1, T, C]
        out = self.model(input_ids=ids, position_ids=positions[None], attention_mask=mask, use_cache=True,
                         logits_to_keep=num_logits, **{self._kv_kwarg: self.kv})
        return out.logits[0]  # [num_logits, V]

    def forward(self, ids: list[int], num_logits: int) -> torch.Tensor:
        num_tokens, start = len(ids), self.kv.length
        graph = self._graph(num_tokens, num_logits) if start > 0 else None
        if graph is not None:
            logits = graph.replay(ids, start)
            self.num_replays += 1
        else:
            inputs = torch.tensor(ids + [start], dtype=torch.long, device=self.device)  # [T + 1]
            logits = self.step(inputs, num_tokens, num_logits)
        self.kv.advance(num_tokens)
        return logits

    def _graph(self, num_tokens: int, num_logits: int) -> StepGraph | None:
        if not self.graphs or num_tokens > self.max_graph_tokens:
            return None
        if self._capturable is None:
            self._capturable = capturable(self.model, self.device)
            if not self._capturable:
                log.info("%s: forward not capturable here (no CUDA, hooks, or experts that sync); runs eagerly",
                         type(self.model).__name__)
        if not self._capturable:
            return None
        key = (num_tokens, num_logits)
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                self._graphs[key] = StepGraph(self.step, num_tokens, num_logits, self.device, self.kv.capacity,
                                              self._pool, self.events)
            except RuntimeError:
                log.exception("CUDA graph capture of %s at T=%d failed; this decoder runs eagerly",
                              type(self.model).__name__, num_tokens)
                self._capturable = False
                return None
        return self._graphs[key]

    def crop(self, length: int) -> None:
        self.kv.crop(length)


def make_decoder(model: nn.Module, device: torch.device, mode: str = "eager", max_graph_tokens: int = 1,
                 events: ExpertEventLog | None = None) -> DynamicDecoder | StaticDecoder:
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; valid: {', '.join(DECODE_MODES)}")
    if mode == "eager":
        return DynamicDecoder(model, device)
    return StaticDecoder(model, device, graphs=mode == "graphs", max_graph_tokens=max_graph_tokens, events=events)
