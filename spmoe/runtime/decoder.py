"""
Decoders: a model's forward over its own KV cache, the one seam between the engine (or the
drafter) and the cache. `hardware.decode` picks one for the target and the draft alike:

- `eager`: transformers' `DynamicCache`, grown per step and cropped after a rejection;
- `static`: a `PositionedCache` of fixed capacity (`spmoe.runtime.static_cache`); every forward
  has static shapes for its T, and rollback moves the host length pointer;
- `graphs`: `static`, and each decode forward of T <= `max_graph_tokens` tokens is replayed from CUDA
  graphs: the whole forward as one graph captured at its first use (`spmoe.runtime.graphs`) where
  it is capturable (on CUDA, no hooks, experts served without a host sync); else, on CUDA without
  hooks, the forward cut at every experts call into graphs with the experts run eagerly between
  them (`spmoe.runtime.piecewise`), captured dry before the sequence where `precapture` names the shape,
  else at its second step; elsewhere as `static`. A rotary embedding computed on the host is served
  from device tables inside the graphs (`spmoe.runtime.rope_table`).

Interface (both classes): `reserve(max_len)` sizes the cache once for a run's longest sequence
(so graphs are captured once per shape); `precapture(shapes)` captures the graphs of those
(T, num_logits) shapes before any sequence (piecewise ones dry), so timed steps only replay them; `begin(max_len)` starts a sequence that will hold at most `max_len` positions; `forward(ids, num_logits)` feeds `ids` after the cached positions and
returns the logits of the last `num_logits` [num_logits, V] (on the device, the model's dtype; a
graph's output stays valid until the decoder's next forward); `crop(n)` keeps the first n
positions; `length` is the number of cached positions. Prefill (the first forward of a
sequence) always runs eagerly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import DynamicCache

from spmoe.runtime import rope_table
from spmoe.runtime.graphs import StepGraph, capturable
from spmoe.runtime.piecewise import PiecewiseGraph, piecewise_capturable
from spmoe.runtime.static_cache import PositionedCache, causal_mask
from spmoe.spec.kv import cache_kwarg, crop_to
from spmoe.trace.records import ExpertEventLog

log = logging.getLogger(__name__)
DECODE_MODES = ("eager", "static", "graphs")
CAPACITY_QUANTUM = 64  # capacities are rounded up to this (aligned masks for the attention kernels)


class DynamicDecoder:
    capacity = None  # the cache grows
    num_replays = 0  # no graphs
    replayed = False

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self._kv_kwarg = cache_kwarg(model)
        self.kv: DynamicCache | None = None
        self.length = 0

    def begin(self, max_len: int) -> None:
        self.kv = DynamicCache(config=self.model.config)
        self.length = 0

    def reserve(self, max_len: int) -> None:
        """Nothing to reserve: the cache grows."""

    def precapture(self, shapes: list[tuple[int, int]]) -> None:
        """Nothing to capture: every step runs eagerly."""

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
        self._dtype = model.get_input_embeddings().weight.dtype  # the attention mask's
        self.kv: PositionedCache | None = None
        self._key_idx: torch.Tensor | None = None  # [C] arange
        self._graphs: dict[tuple[int, int], StepGraph | PiecewiseGraph] = {}  # (T, num_logits) -> graph
        self._warm: set[tuple[int, int]] = set()  # shapes whose first step ran (piecewise capture waits for it)
        self._pool = None
        self._kind: str | None = None  # whole | piecewise | none, decided at the first graphed step after allocation
        self.num_replays = 0
        self.replayed = False  # whether the last forward ran as a graph (host-side hook work then follows it)

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def capacity(self) -> int | None:
        return None if self.kv is None else self.kv.capacity

    def begin(self, max_len: int) -> None:
        self.reserve(max_len)
        self.kv.crop(0)

    def reserve(self, max_len: int) -> None:
        """Make room for sequences of `max_len` positions (a larger cache drops the captured graphs)."""
        need = max_len + self.max_graph_tokens  # the tail that graph warm-ups write (see spmoe.runtime.graphs)
        if self.kv is None or self.kv.capacity < need:
            self.allocate(-(-need // CAPACITY_QUANTUM) * CAPACITY_QUANTUM)

    def allocate(self, capacity: int) -> None:
        """A cache of exactly `capacity` positions (the lossless check mirrors a run's)."""
        self._graphs.clear()  # they hold the old cache's addresses
        self.kv = None
        self.kv = PositionedCache(self.model.config, capacity)
        if self.graphs:
            rope_table.install(self.model, capacity)
        self._key_idx = torch.arange(capacity, device=self.device)  # [C]
        self._pool = None
        self._kind = None
        self._warm.clear()

    def precapture(self, shapes: list[tuple[int, int]]) -> None:
        """Capture the graphs of these (T, num_logits) shapes now, before any sequence, so a run's timed
        steps replay them: whole-step graphs where the forward is capturable whole, else piecewise ones
        captured dry (`PiecewiseGraph.precapture`); both write only the cache's tail (see
        `spmoe.runtime.graphs`). The kind is judged here: a cache that can hold every expert starts full
        (`spmoe.offload.assemble`), so the forward is what its decode steps will run. Other shapes are
        still captured at their first use."""
        if not self.graphs or self.kv is None:
            return
        self._judge_kind()
        for num_tokens, num_logits in shapes:
            if num_tokens > self.max_graph_tokens or (num_tokens, num_logits) in self._graphs:
                continue
            if self._kind == "whole":
                self._capture_whole(num_tokens, num_logits)
            elif self._kind == "piecewise":
                self._capture_piecewise(num_tokens, num_logits)

    def _judge_kind(self) -> None:
        if self._kind is None:
            self._kind = ("whole" if capturable(self.model, self.device) else
                          "piecewise" if piecewise_capturable(self.model, self.device) else "none")
            log.info("%s on %s: CUDA graphs %s", type(self.model).__name__, self.device.type, self._kind)

    def _capture_piecewise(self, num_tokens: int, num_logits: int) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph = PiecewiseGraph.precapture(self.step, num_tokens, num_logits, self.kv.capacity, self.model,
                                              self.device, self._pool)
        except RuntimeError:
            log.exception("CUDA graph precapture (piecewise) of %s at T=%d failed; this shape is captured at its"
                          " first use", type(self.model).__name__, num_tokens)
            return
        self._graphs[(num_tokens, num_logits)] = graph
        self._warm.add((num_tokens, num_logits))

    def _capture_whole(self, num_tokens: int, num_logits: int) -> StepGraph | None:
        self._judge_kind()
        if self._kind != "whole":
            return None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph = StepGraph(self.step, num_tokens, num_logits, self.device, self.kv.capacity, self._pool, self.events)
        except RuntimeError:
            log.exception("CUDA graph capture (whole) of %s at T=%d failed; this decoder runs eagerly",
                          type(self.model).__name__, num_tokens)
            self._kind = "none"
            return None
        self._graphs[(num_tokens, num_logits)] = graph
        return graph

    def step(self, inputs: torch.Tensor, num_tokens: int, num_logits: int) -> torch.Tensor:
        """One forward from device inputs [T + 1] (ids, then the start position): logits [num_logits, V].
        The eager path and every captured graph run exactly this."""
        ids = inputs[:num_tokens].view(1, num_tokens)  # [1, T]
        positions = inputs[num_tokens:] + self._key_idx[:num_tokens]  # [T]
        self.kv.write_positions = positions
        mask = causal_mask(positions, self._key_idx, self._attn, self._dtype)  # [1, 1, T, C]
        out = self.model(input_ids=ids, position_ids=positions[None], attention_mask=mask, use_cache=True,
                         logits_to_keep=num_logits, **{self._kv_kwarg: self.kv})
        return out.logits[0]  # [num_logits, V]

    def forward(self, ids: list[int], num_logits: int) -> torch.Tensor:
        num_tokens, start = len(ids), self.kv.length
        logits = None
        if self.graphs and start > 0 and num_tokens <= self.max_graph_tokens:
            logits = self._graphed(ids, start, num_logits)
        self.replayed = logits is not None
        if logits is None:
            inputs = torch.tensor(ids + [start], dtype=torch.long, device=self.device)  # [T + 1]
            logits = self.step(inputs, num_tokens, num_logits)
        self.kv.advance(num_tokens)
        return logits

    def _graphed(self, ids: list[int], start: int, num_logits: int) -> torch.Tensor | None:
        """The step's logits from a graph (replayed, or captured now), or None: run it eagerly."""
        key = (len(ids), num_logits)
        graph = self._graphs.get(key) or self._capture_whole(*key)
        if graph is not None:
            self.num_replays += 1
            return graph.replay(ids, start)
        if self._kind != "piecewise":
            return None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            if key not in self._warm:  # a shape's first step runs eagerly: lazy initialisation stays out of capture
                self._warm.add(key)
                return None
            graph = PiecewiseGraph(self.step, ids, start, num_logits, self.model, self.device, self._pool)
        except RuntimeError:
            log.exception("CUDA graph capture (piecewise) of %s at T=%d failed; this decoder runs eagerly",
                          type(self.model).__name__, len(ids))
            self._kind = "none"
            return None
        self._graphs[key] = graph
        return graph.logits

    def crop(self, length: int) -> None:
        self.kv.crop(length)


def make_decoder(model: nn.Module, device: torch.device, mode: str = "eager", max_graph_tokens: int = 1,
                 events: ExpertEventLog | None = None) -> DynamicDecoder | StaticDecoder:
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; valid: {', '.join(DECODE_MODES)}")
    if mode == "eager":
        return DynamicDecoder(model, device)
    return StaticDecoder(model, device, graphs=mode == "graphs", max_graph_tokens=max_graph_tokens, events=events)
