"""
Piecewise CUDA graphs of one decode step, for forwards whose experts must run eagerly (offloaded
methods: routes go to the host, copies are issued from the CPU, the cache changes every step).

The step is cut at every engine experts call: segment 0 runs from the step's inputs to layer 0's
experts (embedding, attention with the KV cache, norms, router), segment i from layer i-1's experts
output to layer i's experts, the last one to the logits. Segments are CUDA graphs; the experts run
eagerly between them, exactly as without graphs (same provider, same misses, same events), so a
miss never forces a rebuild: nothing of the cache's state is captured.

Capture (`PiecewiseGraph.__init__`) is a real step: on a side stream, capture segment 0; at the first
experts call (`OffloadedExperts.segment`), end the capture, replay it (so its outputs exist), compute
the experts eagerly, keep their output as the static input of the next segment, and begin capturing
that one; at the end, capture_end and replay the last. Replay repeats this with `replay` in place of
capture: graph 0, experts 0 (output copied into its static buffer), graph 1, ... All segments share
one memory pool and always run in capture order, so a segment may reuse memory an earlier one freed.
Each experts call's inputs (hidden states, routes, weights: tensors of the pool) stay referenced,
so no later segment overwrites them before the experts read them.

A *dry* capture (`dry=True`, `PiecewiseGraph.precapture`) captures the same segments before any sequence,
so a run's timed steps only replay them: the experts calls return zeros of their output's shape without
touching the provider (no loads, no events, no seam hooks), the step's inputs point at the cache's last T
positions (which only warm-ups write, as for whole-step graphs), and one dry eager step first keeps lazy
initialisation out of the capture. Segments capture kernels, not values, so a dry capture's segments
equal a real one's; its logits are meaningless.

Each call site also gets an `ExpertsGraph`: at replay, when the provider pinned all of the layer's
experts at once and the Triton kernels serve (`OffloadedExperts.compute` with `site`), the layer's
expert kernels and the routes' weighted sum run as one small CUDA graph, captured at the site's second
such use, instead of being launched one by one from Python. It reads only static addresses (the call's
inputs, the cache's whole slot storage, the layer's device slot-map row, see
`spmoe.offload.layer_slots`) and writes the call's static output; the slot map and the ready waits are
enqueued eagerly before it and the free events after it, so the provider's ordering is unchanged.
The site graphs of one piecewise graph share a memory pool: nothing allocated in one outlives its
replay, and they replay one at a time on one stream.

An experts module's seam hooks (`spmoe.models.experts.on_experts_call`: predictors' host work on the
call's inputs) run at the seam, after the segment before it has run and before the experts, at capture
and at every replay, as in an eager forward, and always on the *ambient* stream (the one the step was
called on, which no graph captures): at capture it waits for the side stream's segment, and the side
stream waits for the hooks before the experts. Never on the capture stream: the caching host allocator
fences a freed pinned buffer (a prediction's device->host copy) with an event on every stream that used
it, at free time and from whichever thread frees it (the prefetch worker); a fence on the capture stream
recorded while that stream captures a later segment or graph is captured instead of recorded, and the
allocator's next query of it fails ("invalid argument" at a later pinned allocation or `.item()`).

Which forwards qualify (`piecewise_capturable`): on CUDA, no forward hooks anywhere in the model but
graph-safe ones (`spmoe.hooks.mark_graph_safe`; any other would run at capture only), at least one engine
experts module.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from spmoe.hooks import building
from spmoe.models.experts import OffloadedExperts
from spmoe.runtime.graphs import StepFn, graph_safe
from spmoe.runtime.streams import dedicated_stream, on_stream


class ExpertsGraph:
    """One experts call site: `run(layer)` writes layer() into the site's static `out` [T, H] and returns
    it; eager at the first run (which also compiles the kernels for these shapes), captured at the
    second, replayed from then on. `layer` must read only static addresses (see the module docstring)."""

    def __init__(self, out: torch.Tensor, pool):
        self.out, self._pool = out, pool
        self._graph: torch.cuda.CUDAGraph | None = None
        self._warm = False
        self.num_replays = 0

    def run(self, layer: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._graph is None:
            if not self._warm:
                self._warm = True
                return self.out.copy_(layer())
            self._graph = self._capture(layer)
        self._graph.replay()
        self.num_replays += 1
        return self.out

    def _capture(self, layer: Callable[[], torch.Tensor]) -> torch.cuda.CUDAGraph:
        """Capture on a side stream ordered after the current one; unlike `torch.cuda.graph`, no device
        synchronize, garbage collection or cache release: this runs inside a timed decode step."""
        current = torch.cuda.current_stream(self.out.device)
        side = dedicated_stream(self.out.device, "capture")
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with on_stream(side):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                self.out.copy_(layer())
            finally:
                graph.capture_end()
        current.wait_stream(side)
        return graph


ExpertsCall = tuple[OffloadedExperts, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, ExpertsGraph]


def capture_streams(device: torch.device) -> tuple[torch.cuda.Stream | None, torch.cuda.Stream | None]:
    """(ambient, capture) streams of a piecewise capture on `device`; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.current_stream(device), dedicated_stream(device, "capture")


def piecewise_capturable(model: nn.Module, device: torch.device) -> bool:
    has_experts = any(isinstance(m, OffloadedExperts) for m in model.modules())
    return device.type == "cuda" and has_experts and graph_safe(model, device, experts_run_eagerly=True)


class PiecewiseGraph:
    def __init__(self, step: StepFn, ids: list[int], start: int, num_logits: int, model: nn.Module,
                 device: torch.device, pool, graph_factory: Callable = torch.cuda.CUDAGraph, dry: bool = False):
        """Capture the step for `ids` at `start` while computing it: `self.logits` are its logits (with `dry`,
        the experts are zeros and the logits meaningless: see the module docstring)."""
        self.num_tokens = len(ids)
        self._dry = dry
        self._pool = pool
        self._new_graph = graph_factory
        self.graphs: list = []
        self.calls: list[ExpertsCall] = []
        self._sites_pool = None  # one memory pool for the call sites' expert graphs
        self.inputs = torch.zeros(self.num_tokens + 1, dtype=torch.long, device=device)  # [T + 1]: ids, start
        experts = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
        self._ambient, self._side = capture_streams(device)
        side = self._side
        if side is not None:
            side.wait_stream(self._ambient)
        with building(), on_stream(side):
            self.inputs.copy_(torch.tensor(ids + [start], dtype=torch.long))
            capturing = False
            try:
                with experts_segment(experts, self._split):
                    self._begin()
                    capturing = True
                    self.logits = step(self.inputs, self.num_tokens, num_logits)  # [num_logits, V], static
                    capturing = False
                    self._end_and_run()
            finally:
                if capturing:
                    self._abandon()
        if side is not None:
            self._ambient.wait_stream(side)

    def _begin(self) -> None:
        graph = self._new_graph()
        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        self.graphs.append(graph)

    def _end_and_run(self) -> None:
        self.graphs[-1].capture_end()
        self.graphs[-1].replay()

    def _abandon(self) -> None:
        try:
            self.graphs[-1].capture_end()
        except RuntimeError:
            pass

    @classmethod
    def precapture(cls, step: StepFn, num_tokens: int, num_logits: int, capacity: int, model: nn.Module,
                   device: torch.device, pool, graph_factory: Callable = torch.cuda.CUDAGraph) -> "PiecewiseGraph":
        """The graphs of a (T, num_logits) step captured dry, before any sequence, at the cache's last T positions
        of `capacity`, after one dry eager step (see the module docstring)."""
        ids, start = [0] * num_tokens, capacity - num_tokens
        experts = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
        with building(), experts_segment(experts, _dry_experts):
            step(torch.tensor(ids + [start], dtype=torch.long, device=device), num_tokens, num_logits)
        return cls(step, ids, start, num_logits, model, device, pool, graph_factory, dry=True)

    def _split(self, module: OffloadedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> torch.Tensor:
        self._end_and_run()
        if self._dry:
            out = _dry_experts(module, hidden_states, top_k_index, top_k_weights)  # [T, H], outside the pool
        else:
            self._seam_hooks(module, (hidden_states, top_k_index, top_k_weights))
            out = module.compute(hidden_states, top_k_index, top_k_weights)  # [T, H], outside the pool
        if self._sites_pool is None and out.is_cuda:
            self._sites_pool = torch.cuda.graph_pool_handle()
        self.calls.append((module, (hidden_states, top_k_index, top_k_weights), out, ExpertsGraph(out, self._sites_pool)))
        self._begin()
        return out

    def _seam_hooks(self, module: OffloadedExperts, args: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """The call's seam hooks during capture, on the ambient stream, between the segment just run and the
        experts (see the module docstring)."""
        if self._side is None:
            module.run_seam_hooks(*args)
            return
        self._ambient.wait_stream(self._side)
        with on_stream(self._ambient):
            module.run_seam_hooks(*args)
        self._side.wait_stream(self._ambient)

    def replay(self, ids: list[int], start: int) -> torch.Tensor:
        """Logits [num_logits, V] of feeding `ids` at positions [start, start + T); experts run eagerly."""
        self.inputs.copy_(torch.tensor(ids + [start], dtype=torch.long))
        for i, graph in enumerate(self.graphs):
            graph.replay()
            if i < len(self.calls):
                module, args, out, site = self.calls[i]
                module.run_seam_hooks(*args)
                got = module.compute(*args, site=site)
                if got is not out:
                    out.copy_(got)
        return self.logits


@contextmanager
def experts_segment(experts: list[OffloadedExperts], segment: Callable):
    """Every experts module hands its calls to `segment` inside the block (`OffloadedExperts.segment`)."""
    for m in experts:
        m.segment = segment
    try:
        yield
    finally:
        for m in experts:
            m.segment = None


def _dry_experts(module: OffloadedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
    """An experts call's output [T, H] as zeros, touching nothing (a dry capture's stand-in)."""
    return torch.zeros_like(hidden_states)
