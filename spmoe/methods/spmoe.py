"""
spmoe: SP-MoE (arXiv 2510.10302) = SD + draft->target-router expert prediction + cutoff-layer
policy + pipelined, batched prefetch.

Assembled from shared components: `PrefetchProvider` (cache + transfer engine + worker thread),
`DraftRouterPredictor` (hooks on the draft that push per-layer predictions while it drafts) and
the cutoff policy (`spmoe.policy.cutoff`), whose `auto` mode takes a profile (t_d, t_e, t_v and
the predictor's per-layer recall r_l; measured and cached by content in `spmoe.policy.profile`,
re-taken with `cutoff.reprofile=true`; its key, t_e, bandwidth check and L* go into the summary).
Profiling and map fitting serve experts from temporary on-demand caches that are freed before the
prefetch runtime is built.
Ablations are `method.*` switches: cutoff.mode off/fixed/all/auto, worker_thread, batched_io,
capture_point, predict_top_k.
Faithful: predictor, cutoff rule (our latency model, written down in cutoff.py), worker thread
with its own copy stream, per-expert events, batched per-layer submission, protection until the
verify step passes the layer. Beyond the paper: non-twinned pairs get learned affine
draft->target hidden maps (`spmoe.predict.hidden_map`), fitted once on seeded synthetic
calibration sequences (never the evaluation prompts) and cached on disk by content.
Simplified: the prediction of draft token j is used for verify position j only (the last verify
position, the token the draft has not read yet, is not predicted).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch

from spmoe.offload.assemble import on_demand_runtime, prefetch_runtime
from spmoe.offload.budget import capped_slots
from spmoe.offload.eviction import make_policy
from spmoe.policy.cutoff import Profile, choose_cutoff
from spmoe.policy.profile import (  # noqa: F401  (measure_profile, measure_recall: this module's public names)
    ProfileRecord,
    context_fields,
    draft_source,
    load_or_measure,
    measure_profile,
    measure_recall,
    model_source,
)
from spmoe.predict.draft_router import DraftRouterPredictor, is_twin
from spmoe.predict.hidden_map import fit_maps, load_or_fit
from spmoe.strategy import MethodContext, Runtime, register_strategy

log = logging.getLogger(__name__)
CALIBRATION_SHAPE = (8, 64)  # hidden-map calibration: sequences x tokens


def profile_record(ctx: MethodContext, slots: int, maps: dict[int, torch.Tensor] | None,
                   full_precision: Callable[[], AbstractContextManager] | None = None) -> ProfileRecord:
    """The cached profile for this context (keyed by content), or one measured on a temporary
    on-demand cache of `slots` slots (`full_precision`: see `measure_profile`)."""

    def measure() -> Profile:
        temp = on_demand_runtime(ctx, slots, "lru")
        try:
            recall = measure_recall(ctx, maps)  # before measure_profile, which overwrites the temporary cache
            return measure_profile(ctx, temp.cache, temp.transfer, recall, full_precision)
        finally:
            temp.close()

    return load_or_measure(ctx, context_fields(ctx, slots, maps is not None), measure)


def _hidden_maps(ctx: MethodContext, slots: int) -> dict[int, torch.Tensor]:
    """Fit (or load) the draft->target maps, serving experts from a temporary on-demand cache."""
    cfg = ctx.cfg
    vocab = ctx.target.model.config.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed + 12345)  # calibration never reuses the evaluation prompts
    sequences = torch.randint(3, vocab, CALIBRATION_SHAPE, generator=gen).tolist()
    fields = {"model": ctx.target.model.config.to_dict(), "model_source": model_source(cfg),
              "draft": ctx.draft.config.to_dict(), "draft_source": draft_source(cfg),
              "capture_point": cfg.method.capture_point, "calibration_seed": cfg.seed,
              "calibration_shape": CALIBRATION_SHAPE, "device": ctx.device.type}

    def fit() -> dict[int, torch.Tensor]:
        temp = on_demand_runtime(ctx, slots, "lru")
        try:
            return fit_maps(ctx.draft, ctx.target.model, list(ctx.target.layout.moe_layers), sequences,
                            cfg.method.capture_point, ctx.device)
        finally:
            temp.close()

    return load_or_fit(Path(cfg.method.cutoff.profile_dir).expanduser().parent / "maps", fields, fit)


@register_strategy("spmoe", offloads=True, speculative=True,
                   description="SD + draft->target-router prefetch + cutoff layer + pipelined batched prefetch")
def build(ctx: MethodContext) -> Runtime:
    mcfg, layout = ctx.cfg.method, ctx.target.layout
    slots = capped_slots(ctx.plan.num_slots, mcfg.num_slots)
    maps = None if is_twin(ctx.draft, ctx.target.model) else _hidden_maps(ctx, slots)
    record = profile_record(ctx, slots, maps) if mcfg.cutoff.mode == "auto" else None
    profile = record.profile if record else None
    runtime, provider = prefetch_runtime(ctx, make_policy(mcfg.eviction, layout.moe_layers), slots)
    model = runtime.model
    last = choose_cutoff(mcfg.cutoff, len(layout.moe_layers), profile, ctx.cfg.spec.num_draft_tokens)
    layers = list(layout.moe_layers[: last + 1])
    if runtime.prefetch:  # off when every expert is resident (spmoe.offload.assemble)
        log.info("spmoe: cutoff mode %s -> prefetching %d of %d MoE layers", mcfg.cutoff.mode, len(layers),
                 len(layout.moe_layers))
    runtime.cutoff_layer = last
    runtime.extra_summary = lambda: {"cutoff_mode": mcfg.cutoff.mode, "cutoff_layer": last,
                                     **(record.summary() if record else {"profile_layer_recall": None})}
    if layers and runtime.prefetch:
        predictor = DraftRouterPredictor(ctx.draft, model, provider, layers, mcfg.capture_point,
                                         mcfg.predict_top_k or layout.top_k, maps)
        runtime.attach(predictor, predictor.after_draft_forward)
    return runtime
