"""
Assembling the shared offload components (cache, transfer engine, provider) into a Runtime.

Baselines call `on_demand_runtime` with their own slot count and eviction policy instead of
wiring the components by hand, so every method's copies, events and counters are the same code.
"""

from __future__ import annotations

import torch

from spmoe.models.experts import install_experts
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import make_policy
from spmoe.offload.provider import OnDemandProvider
from spmoe.offload.transfer import TransferEngine
from spmoe.strategy import MethodContext, Runtime
from spmoe.trace.records import ExpertEventLog


def on_demand_runtime(ctx: MethodContext, num_slots: int, eviction: str, preload: bool = False) -> Runtime:
    """Experts served from an `ExpertCache` of `num_slots` slots, loading misses on demand.

    With `preload`, every expert is copied in before the run (the GPU-resident reference):
    those copies are not counted as the run's traffic."""
    layout, store = ctx.target.layout, ctx.target.store
    if preload and num_slots < len(layout.keys):
        raise ValueError(f"preloading {len(layout.keys)} experts needs as many slots, got {num_slots}")
    cache = ExpertCache(num_slots, layout.expert_numel, layout.dtype, ctx.device, make_policy(eviction, layout.moe_layers))
    transfer = TransferEngine(ctx.device, num_slots)
    events = ExpertEventLog()
    if preload:
        for key in layout.keys:
            slot = cache.preload(key)
            transfer.load(slot, cache.slot(slot), store.flat(key))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        transfer.collect()
    install_experts(ctx.target.model, layout, OnDemandProvider(cache, store, transfer, events))

    def close() -> None:
        cache.storage = None
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
            torch.cuda.empty_cache()

    return Runtime(model=ctx.target.model, events=events, transfer=transfer, cache=cache, closers=[close])
