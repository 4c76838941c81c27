"""
Attaching routing replay and routing recording to a method's `Runtime`, method-agnostically:
both are step listeners plus hooks with closers, and predictors opt in through their `replay`
(trace-fed guesses) and `observers` (recorded guesses) attributes. Replay hooks run before any
other expert hook, so recording a replayed run records what was replayed.
"""

from __future__ import annotations

from spmoe.models.experts import ExpertLayout
from spmoe.strategy import Runtime
from spmoe.trace.recorder import RoutingRecorder
from spmoe.trace.replay import RouteReplay
from spmoe.trace.routing import RoutingTrace


def attach_replay(runtime: Runtime, trace: RoutingTrace, layout: ExpertLayout, speculative: bool,
                  num_draft_tokens: int, graphs: bool = False) -> RouteReplay:
    replay = RouteReplay(trace, layout, speculative, num_draft_tokens, graphs)
    replay.install(runtime.model)
    runtime.listeners.insert(0, replay)
    runtime.closers.append(replay.remove)
    runtime.accept_override = replay.accept
    for listener in runtime.listeners:
        if hasattr(listener, "replay"):
            listener.replay = replay
    return replay


def attach_recorder(runtime: Runtime, layout: ExpertLayout, lookahead_depth: int) -> RoutingRecorder:
    recorder = RoutingRecorder(runtime.model, layout, lookahead_depth)
    runtime.attach(recorder)
    for listener in runtime.listeners:
        if hasattr(listener, "observers"):
            listener.observers.append(recorder.observe)
    return recorder
