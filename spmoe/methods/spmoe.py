"""
spmoe: SP-MoE (arXiv 2510.10302) = SD + draft->target-router expert prediction + cutoff-layer
policy + pipelined, batched prefetch.

Assembled from shared components: `PrefetchProvider` (cache + transfer engine + worker thread),
`DraftRouterPredictor` (hooks on the draft that push per-layer predictions while it drafts) and
the cutoff policy (`spmoe.policy.cutoff`), whose `auto` mode profiles this model x draft x
device x budget once (t_d measured on the draft, t_e measured on a copy into a slot, t_v scaled
from t_d by active parameters per layer, r_l the predictor's set recall per layer: measured on
seeded synthetic calibration sequences, or under `routing=replay` read off the trace) and caches
the profile as JSON. Profiling and map fitting serve experts from temporary on-demand caches that
are freed before the prefetch runtime is built.
Ablations are `method.*` switches: cutoff.mode off/fixed/all/auto, worker_thread, batched_io,
capture_point, predict_top_k.
Faithful: predictor, cutoff rule (our latency model, written down in cutoff.py), worker thread
with its own copy stream, per-expert events, batched per-layer submission, protection until the
verify step passes the layer. Beyond the paper: non-twinned pairs get learned affine
draft->target hidden maps (`spmoe.predict.hidden_map`), fitted once on seeded synthetic
calibration sequences (never the evaluation prompts) and cached on disk.
Simplified: the prediction of draft token j is used for verify position j only (the last verify
position, the token the draft has not read yet, is not predicted).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from spmoe.offload.assemble import on_demand_runtime, prefetch_runtime
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import make_policy
from spmoe.offload.transfer import TransferEngine
from spmoe.policy.cutoff import (
    PROFILE_VERSION,
    Profile,
    choose_cutoff,
    load_profile,
    save_profile,
)
from spmoe.predict.draft_router import DraftRouterPredictor, is_twin
from spmoe.predict.hidden_map import fit_maps, load_or_fit
from spmoe.predict.recall import predictor_recall
from spmoe.spec.kv import cache_kwarg
from spmoe.strategy import MethodContext, Runtime, register_strategy
from spmoe.trace.accuracy import trace_layer_recall

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, warmup: int = 3, reps: int = 9) -> float:
    """Median wall time of `fn(i)` (each call synchronized) after `warmup` untimed calls: first-use
    costs and one-off stalls must not set the latency model's constants."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    times = []
    for i in range(warmup, warmup + reps):
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def measure_profile(ctx: MethodContext, cache: ExpertCache, transfer: TransferEngine,
                    layer_recall: list[float] | None = None) -> Profile:
    layout, draft, device = ctx.target.layout, ctx.draft, ctx.device

    def load(i: int) -> None:
        transfer.load(0, cache.slot(0), ctx.target.store.flat(layout.keys[i % len(layout.keys)]))

    expert_ms = _median_ms(load, device)
    transfer.collect()
    ids = torch.zeros(1, 16, dtype=torch.long, device=device)
    kv = DynamicCache(config=draft.config)
    kw = {cache_kwarg(draft): kv}
    draft(input_ids=ids, use_cache=True, **kw)
    draft_layer_ms = _median_ms(lambda i: draft(input_ids=ids[:, :1], use_cache=True, **kw), device,
                                ) / len(draft.model.layers)
    layer = draft.model.layers[0]
    attn = sum(p.numel() for p in layer.self_attn.parameters())
    ffn = sum(p.numel() for p in layer.mlp.parameters())
    active = attn + layout.top_k * layout.expert_numel
    return Profile(draft_layer_ms, draft_layer_ms * active / (attn + ffn), expert_ms, len(layout.moe_layers),
                   layout.num_experts, layout.top_k, cache.num_slots, layer_recall)


@torch.inference_mode()
def measure_recall(ctx: MethodContext, maps: dict[int, torch.Tensor] | None) -> list[float] | None:
    """r_l per MoE layer: from the routing trace under `routing=replay`, else on calibration sequences."""
    cfg, layout = ctx.cfg, ctx.target.layout
    if ctx.routing_trace is not None:
        return trace_layer_recall(ctx.routing_trace, len(layout.moe_layers))
    vocab = ctx.target.model.config.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed + 23456)  # never the evaluation prompts, nor the maps' sequences
    sequences = torch.randint(3, vocab, (4, 64), generator=gen).tolist()
    return predictor_recall(ctx.draft, ctx.target.model, list(layout.moe_layers), sequences,
                            cfg.method.capture_point, cfg.method.predict_top_k or layout.top_k, maps, ctx.device)


def _routing_key(ctx: MethodContext) -> str:
    """`model`, or `replay-<digest of the trace file>`: recall depends on where routing comes from."""
    routing = ctx.cfg.routing
    if routing.name != "replay":
        return routing.name
    path = Path(routing.trace_path).expanduser()
    path = path / "routing_trace.npz" if path.is_dir() else path
    return f"replay-{hashlib.sha1(path.read_bytes()).hexdigest()[:12]}"


def _profile(ctx: MethodContext, slots: int, maps: dict[int, torch.Tensor] | None) -> Profile:
    """Load the cached profile, or measure it on a temporary on-demand cache of `slots` slots."""
    cfg = ctx.cfg
    budget = cfg.hardware.gpu_budget_gib
    top_k = cfg.method.predict_top_k or ctx.target.layout.top_k
    name = (f"v{PROFILE_VERSION}__{cfg.model.name}__{cfg.draft.name}__{ctx.device.type}__{budget}__{slots}"
            f"__{cfg.method.capture_point}__top{top_k}__{_routing_key(ctx)}.json")
    path = Path(cfg.method.cutoff.profile_dir).expanduser() / name
    profile = load_profile(path)
    if profile is None:
        temp = on_demand_runtime(ctx, slots, "lru")
        try:
            profile = measure_profile(ctx, temp.cache, temp.transfer, measure_recall(ctx, maps))
        finally:
            temp.close()
        save_profile(path, profile)
        log.info("profiled %s: %s", path, profile)
    return profile


def _hidden_maps(ctx: MethodContext, slots: int) -> dict[int, torch.Tensor]:
    """Fit (or load) the draft->target maps, serving experts from a temporary on-demand cache."""
    cfg = ctx.cfg
    name = f"{cfg.model.name}__{cfg.draft.name}__{cfg.method.capture_point}__{cfg.seed}.safetensors"
    path = Path(cfg.method.cutoff.profile_dir).expanduser().parent / "maps" / name
    vocab = ctx.target.model.config.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed + 12345)  # calibration never reuses the evaluation prompts
    sequences = torch.randint(3, vocab, (8, 64), generator=gen).tolist()

    def fit() -> dict[int, torch.Tensor]:
        temp = on_demand_runtime(ctx, slots, "lru")
        try:
            return fit_maps(ctx.draft, ctx.target.model, list(ctx.target.layout.moe_layers), sequences,
                            cfg.method.capture_point, ctx.device)
        finally:
            temp.close()

    return load_or_fit(path, fit)


@register_strategy("spmoe", offloads=True, speculative=True,
                   description="SD + draft->target-router prefetch + cutoff layer + pipelined batched prefetch")
def build(ctx: MethodContext) -> Runtime:
    mcfg, layout = ctx.cfg.method, ctx.target.layout
    slots = ctx.plan.num_slots if mcfg.num_slots is None else min(ctx.plan.num_slots, mcfg.num_slots)
    maps = None if is_twin(ctx.draft, ctx.target.model) else _hidden_maps(ctx, slots)
    profile = _profile(ctx, slots, maps) if mcfg.cutoff.mode == "auto" else None
    runtime, provider = prefetch_runtime(ctx, make_policy(mcfg.eviction, layout.moe_layers), slots)
    model = runtime.model
    last = choose_cutoff(mcfg.cutoff, len(layout.moe_layers), profile, ctx.cfg.spec.num_draft_tokens)
    layers = list(layout.moe_layers[: last + 1])
    log.info("spmoe: cutoff mode %s -> prefetching %d of %d MoE layers", mcfg.cutoff.mode, len(layers),
             len(layout.moe_layers))
    runtime.cutoff_layer = last
    runtime.extra_summary = lambda: {"cutoff_mode": mcfg.cutoff.mode, "cutoff_layer": last,
                                     "profile_layer_recall": profile.layer_recall if profile else None}
    if layers:
        predictor = DraftRouterPredictor(ctx.draft, model, provider, layers, mcfg.capture_point,
                                         mcfg.predict_top_k or layout.top_k, maps)
        runtime.listeners.append(predictor)
        runtime.closers.append(predictor.remove)
    return runtime
