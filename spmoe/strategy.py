"""
Methods as registered strategies.

A method is a build function that, given the shared `MethodContext` (target model skeleton with
its store, device, memory plan, config), returns a `Runtime`: the model to run with its experts
served, and the components the engine reads stats from. Every method goes through the same
`Engine`; none forks the loop, the timers or the trace. Methods register themselves with
`@register_strategy(name, offloads=..., description=...)`: the project's own in `spmoe/methods/`,
the re-implemented baselines in `baselines/`; importing `spmoe.methods` registers both.
A speculative method may decline the session's draft for one run (`accepts_draft`, consulted by
the session whenever it plans that run, with a `DraftOffer`); a declined run is planned, built and
decoded as a method without SD (no draft bytes in its plan, `MethodContext.draft` None, one token
per step), so it must answer the same for the same offer. Methods without the hook always draft.
This module imports no method (no import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from spmoe.config import RunConfig
from spmoe.offload.budget import MemoryPlan
from spmoe.offload.cache import ExpertCache
from spmoe.offload.transfer import TransferEngine, TransferStats
from spmoe.trace.records import ExpertEventLog


@dataclass
class MethodContext:
    cfg: RunConfig
    target: "TargetModel"  # noqa: F821  (spmoe.models.build.TargetModel; avoids an import cycle)
    device: torch.device
    plan: MemoryPlan
    draft: nn.Module | None = None  # the session's draft model (SD methods)
    routing_trace: object = None  # routing=replay: the loaded RoutingTrace (spmoe.trace.routing)
    draft_offer: DraftOffer | None = None  # speculative methods with `accepts_draft`: what they were offered
    memory: dict = field(default_factory=dict)  # state a method keeps across a session's runs of one configuration


@dataclass
class DraftOffer:
    """What a speculative method with `accepts_draft` is shown when the session plans its run.

    `with_draft` is None when the session has no draft or the budget cannot hold it; `draft` may
    be on `meta` (the session plans before it loads weights): read its shapes only."""

    cfg: RunConfig  # the run's config (its method, hardware and spec)
    target: "TargetModel"  # noqa: F821  (layout, non_expert_bytes; the store may not exist yet)
    draft: nn.Module | None
    draft_weight_bytes: int
    with_draft: MemoryPlan | None
    without_draft: MemoryPlan
    routing_trace: object = None  # routing=replay: the trace (its acceptance is measured)


class StepListener(Protocol):
    """Components that follow the engine's steps (predictors, prefetch providers)."""

    def begin_step(self, step: int) -> None: ...  # before drafting step `step`
    def end_step(self) -> None: ...  # after its verification and acceptance


@dataclass
class Runtime:
    model: nn.Module
    events: ExpertEventLog
    transfer: TransferEngine | None = None
    cache: ExpertCache | None = None
    collect_extra: Callable[[], TransferStats] | None = None  # stats of transfers the engine does not see
    closers: list[Callable[[], None]] = field(default_factory=list)
    listeners: list[StepListener] = field(default_factory=list)
    prefetch_counts: Callable[[], tuple[int, int, int]] | None = None  # (prefetched, dropped, wasted) since last call
    prefetch: bool = False  # whether prefetch predictors may be attached (`spmoe.offload.assemble.prefetch_runtime`)
    extra_summary: Callable[[], dict] | None = None  # method-specific totals merged into summary.json
    accept_override: Callable | None = None  # (drafts, logits [k+1, V]) -> AcceptResult: replayed acceptance
    choose_k: Callable | None = None  # (spmoe.engine.StepState) -> draft tokens this step, clamped to [0, max_k]
    draft_listeners: list[Callable[[bool], None]] = field(default_factory=list)  # `ModelDrafter.on_forward`

    def attach(self, listener: StepListener, after_draft_forward: Callable[[bool], None] | None = None) -> None:
        """Add a step listener (a predictor, a gate) with its `remove`, if it has one, as a closer, and its hook
        after each draft forward, if given."""
        self.listeners.append(listener)
        if after_draft_forward is not None:
            self.draft_listeners.append(after_draft_forward)
        remove = getattr(listener, "remove", None)
        if remove is not None:
            self.closers.append(remove)

    def begin_step(self, step: int) -> None:
        for listener in self.listeners:
            listener.begin_step(step)

    def end_step(self) -> None:
        for listener in self.listeners:
            listener.end_step()

    def collect(self) -> TransferStats:
        stats = self.transfer.collect() if self.transfer else TransferStats()
        if self.collect_extra:
            stats.add(self.collect_extra())
        return stats

    def close(self) -> None:
        """Run the closers last-added first (predictors come off before their provider stops)."""
        for fn in reversed(self.closers):
            fn()
        self.closers.clear()


@dataclass
class StrategySpec:
    name: str
    build: Callable[[MethodContext], Runtime]
    offloads: bool  # False: every expert must fit on the device
    speculative: bool  # drafts with the run's draft model (same draft and k for every SD method)
    description: str
    accepts_draft: Callable[[DraftOffer], bool] | None = None  # speculative only: False declines the draft for a run


STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(name: str, offloads: bool, description: str, speculative: bool = False,
                      accepts_draft: Callable[[DraftOffer], bool] | None = None):
    if accepts_draft is not None and not speculative:
        raise ValueError(f"strategy {name!r}: accepts_draft is for speculative methods")

    def deco(build: Callable[[MethodContext], Runtime]):
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} registered twice")
        STRATEGIES[name] = StrategySpec(name, build, offloads, speculative, description, accepts_draft)
        return build

    return deco


def get_strategy(name: str) -> StrategySpec:
    """The registered method `name`; `spmoe.methods` must be imported first (it registers them all)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(STRATEGIES)}")
    return STRATEGIES[name]
