"""
CUDA graphs of one decode step: a static-shape forward captured once and replayed.

A `StepGraph` holds one captured forward for T tokens and `num_logits` logits, over a static KV cache
(`spmoe.runtime.static_cache`). Its only input is a device buffer [T + 1] long: the T token ids,
then the start position; replay copies the step's ids and start into it, replays, and returns the
static output logits [num_logits, V], valid until the next replay of any graph sharing the pool.

Which forwards can be captured (`capturable`): on CUDA, with no forward hooks anywhere in the
model but graph-safe ones (`spmoe.hooks.mark_graph_safe`: routing replay's; others run host code:
predictors, routing recorders), and every engine experts module sync-free (`OffloadedExperts.sync_free`:
the grouped path over a slot table that can no longer change) and without seam hooks but graph-safe ones
(host work at the experts call, `spmoe.models.experts.on_experts_call`, which only piecewise graphs keep;
adaptive gating's device-side counters are captured). Offloaded methods fail that test and run as
piecewise graphs (`spmoe.runtime.piecewise`) or eagerly; a miss never forces a rebuild.

Capture protocol: two warm-up forwards on a side stream, then the capture. Warm-up executes: it
writes the KV cache, so it writes at the cache's last T positions (never attended before the
sequence reaches them, and overwritten then by the step that reaches them), so a graph can be
captured mid-sequence without disturbing the cache. Expert events: a resident experts module
records each layer's routes as a device tensor (`ExpertEventLog.record_routes`); the captured
forward's route tensors are kept by the graph (so the pool keeps their memory) and handed to the
event log again after every replay, where they hold that replay's routes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from spmoe.hooks import building, is_graph_safe
from spmoe.models.experts import OffloadedExperts
from spmoe.runtime.streams import dedicated_stream
from spmoe.trace.records import ExpertEventLog

log = logging.getLogger(__name__)
WARMUP_FORWARDS = 2

StepFn = Callable[[torch.Tensor, int, int], torch.Tensor]  # (inputs [T + 1], T, num_logits) -> logits [num_logits, V]


def capturable(model: nn.Module, device: torch.device) -> bool:
    """Whether a forward of `model` can be captured whole: on CUDA, and `graph_safe`."""
    return device.type == "cuda" and graph_safe(model, device)


def graph_safe(model: nn.Module, device: torch.device, experts_run_eagerly: bool = False) -> bool:
    """Whether a forward of `model` on `device` runs without host code or device->host syncs that a graph
    would drop (with `experts_run_eagerly`, engine experts modules stay out of the graph, their seam hooks
    with them: only their torch hooks matter)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    for m in model.modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        if not all(is_graph_safe(h) for h in hooks):
            return False
        if isinstance(m, OffloadedExperts) and not experts_run_eagerly and (
                not all(is_graph_safe(h) for h in m.seam_hooks) or not m.sync_free(device)):
            return False
    return True


class StepGraph:
    def __init__(self, step: StepFn, num_tokens: int, num_logits: int, device: torch.device, capacity: int,
                 pool, events: ExpertEventLog | None):
        self.num_tokens = num_tokens
        self.events = events
        self.inputs = torch.zeros(num_tokens + 1, dtype=torch.long, device=device)  # [T + 1]: ids, start
        self.inputs[num_tokens] = capacity - num_tokens  # warm-up writes the cache's last T positions
        held = events.take() if events is not None else []
        try:
            side = dedicated_stream(device, "capture")
            side.wait_stream(torch.cuda.current_stream(device))
            with building(), torch.cuda.stream(side):
                for _ in range(WARMUP_FORWARDS):
                    step(self.inputs, num_tokens, num_logits)
            torch.cuda.current_stream(device).wait_stream(side)
            if events is not None:
                events.take()
            self.graph = torch.cuda.CUDAGraph()
            with building(), torch.cuda.graph(self.graph, pool=pool, stream=side,
                                                    capture_error_mode="thread_local"):
                self.logits = step(self.inputs, num_tokens, num_logits)  # [num_logits, V], static
            self.routes = events.take() if events is not None else []
        finally:
            if events is not None:
                events.extend(held)

    def replay(self, ids: list[int], start: int) -> torch.Tensor:
        """Logits [num_logits, V] of feeding `ids` (T of them) at positions [start, start + T)."""
        self.inputs.copy_(torch.tensor(ids + [start], dtype=torch.long))
        self.graph.replay()
        if self.events is not None:
            self.events.extend(self.routes)
        return self.logits
