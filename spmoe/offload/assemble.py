"""
Assembling the shared offload components (cache, transfer engine, provider) into a Runtime.

Baselines call `on_demand_runtime` / `prefetch_runtime` with their own slot count, eviction
policy and partition instead of wiring the components by hand, so every method's copies, events
and counters are the same code.

A cache with a slot for every expert (in its layer's pool, where partitioned) starts full: every expert is
copied in when the runtime is built, before the run, as for the GPU-resident reference. Such a cache can never
miss or evict, so its slot table is fixed from the first step (`spmoe.runtime.resident`) and the layers are
served without a host sync, as CUDA graphs of the whole forward where nothing else stops them; those copies
are not counted as the run's traffic.

Prefetch is then off (`Runtime.prefetch` False): there is nothing to load, and a predictor's hooks (host
work at every layer) would only keep the forward from being captured whole. The provider starts no worker
thread and still serves and counts (its prefetch counts stay zero); a method attaches its prefetch
predictors, and anything that only steers what is prefetched or evicted, only while `Runtime.prefetch`.
What changes which experts compute (adaptive gating) is not prefetch and stays. A run that records its
routing (`trace.routing`) keeps prefetch on, so its trace holds the predictors' guesses.
"""

from __future__ import annotations

import logging

import torch

from spmoe.models.experts import install_experts
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import EvictionPolicy, make_policy
from spmoe.offload.prefetch import PrefetchProvider
from spmoe.offload.provider import OnDemandProvider
from spmoe.offload.transfer import TransferEngine
from spmoe.strategy import MethodContext, Runtime
from spmoe.trace.records import ExpertEventLog

log = logging.getLogger(__name__)


def on_demand_runtime(ctx: MethodContext, num_slots: int, eviction: str, preload: bool = False) -> Runtime:
    """Experts served from an `ExpertCache` of `num_slots` slots, loading misses on demand.

    With `preload` (the GPU-resident reference) the cache must have a slot for every expert; any cache that
    has one starts full (module docstring)."""
    layout, store = ctx.target.layout, ctx.target.store
    if preload and num_slots < len(layout.keys):
        raise ValueError(f"preloading {len(layout.keys)} experts needs as many slots, got {num_slots}")
    cache = ExpertCache(num_slots, layout.expert_numel, layout.dtype, ctx.device, make_policy(eviction, layout.moe_layers))
    transfer = TransferEngine(ctx.device, num_slots, pace_gb_per_s(ctx))
    events = ExpertEventLog()
    preload_if_all_fit(cache, transfer, ctx)
    install_experts(ctx.target.model, layout, OnDemandProvider(cache, store, transfer, events))
    return Runtime(model=ctx.target.model, events=events, transfer=transfer, cache=cache,
                   closers=[lambda: _free(cache, ctx.device)])


def prefetch_runtime(ctx: MethodContext, policy: EvictionPolicy, num_slots: int,
                     slots_per_layer: dict[int, int] | None = None) -> tuple[Runtime, PrefetchProvider]:
    """Experts served by a `PrefetchProvider` (cache + transfer engine + worker thread, configured by
    `method.worker_thread / batched_io / timeout_s`); the caller adds its predictor as a listener
    and closer where `Runtime.prefetch` (not for a cache that starts full: module docstring).
    Listener order: the provider first, so a step is open before predictions arrive."""
    layout, mcfg = ctx.target.layout, ctx.cfg.method
    cache = ExpertCache(num_slots, layout.expert_numel, layout.dtype, ctx.device, policy, slots_per_layer)
    transfer = TransferEngine(ctx.device, num_slots, pace_gb_per_s(ctx))
    events = ExpertEventLog()
    prefetch = not preload_if_all_fit(cache, transfer, ctx, slots_per_layer) or ctx.cfg.trace.routing
    if not prefetch:
        log.info("%s: prefetch off: every expert is resident (%d slots), no predictor or prefetch worker",
                 ctx.cfg.method.name, num_slots)
    provider = PrefetchProvider(cache, ctx.target.store, transfer, events, mcfg.worker_thread and prefetch,
                                mcfg.batched_io, mcfg.timeout_s)
    install_experts(ctx.target.model, layout, provider)
    runtime = Runtime(model=ctx.target.model, events=events, transfer=transfer, cache=cache, listeners=[provider],
                      prefetch_counts=provider.take_counts, prefetch=prefetch)
    runtime.closers += [lambda: _free(cache, ctx.device), provider.close]  # closers run last-added first
    return runtime, provider


def preload_if_all_fit(cache: ExpertCache, transfer: TransferEngine, ctx: MethodContext,
                       slots_per_layer: dict[int, int] | None = None) -> bool:
    """Copy every expert in when the cache has a slot for each (per layer where partitioned): whether it did."""
    layout, store = ctx.target.layout, ctx.target.store
    if slots_per_layer is None:
        fits = cache.num_slots >= len(layout.keys)
    else:
        fits = all(slots_per_layer.get(layer, 0) >= layout.num_experts for layer in layout.moe_layers)
    if not fits:
        return False
    for key in layout.keys:
        slot = cache.preload(key)
        transfer.load(slot, cache.slot(slot), store.flat(key))
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    transfer.collect()
    return True


def pace_gb_per_s(ctx: MethodContext) -> float | None:
    """The emulated PCIe bandwidth when `hardware.pace_pcie` is on (else None: the real link)."""
    hw = ctx.cfg.hardware
    if not hw.pace_pcie:
        return None
    if not hw.pcie_gb_per_s:
        raise ValueError(f"hardware.pace_pcie=true needs hardware.pcie_gb_per_s (hardware {hw.name!r} has none)")
    return hw.pcie_gb_per_s


def _free(cache: ExpertCache, device: torch.device) -> None:
    cache.storage = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
