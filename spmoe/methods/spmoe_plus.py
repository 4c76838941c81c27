"""
spmoe_plus: SP-MoE's predictor, cutoff and pipelined prefetch (`spmoe.methods.spmoe`), plus four
parts, each a `method.plus.*` switch (`spmoe.config.PlusConfig`) so its gain is measured alone:
1. memory-aware draft (`spmoe.plus.draft_precision`, `spmoe.plus.draft_choice`): no draft at all
   (`none`), or the draft in bf16 or int8 / int4 weight-only, the bytes saved becoming expert slots on
   top of the memory plan's; `auto` picks among them by a latency model from the memory plans,
   acceptance and the link, before the session plans the run (`StrategySpec.accepts_draft`), and a
   quantized pick must pass calibration agreement with the bf16 draft (not under routing=replay,
   where the trace sets acceptance);
2. CPU-assisted experts (`spmoe.plus.host_experts`): missing experts of a layer are computed on
   the host while others stream in, per expert from a measured cost model; under `auto` the prefill stays on
   the link and the run's own decode steps switch the host off where it makes steps slower per missing
   expert (`spmoe.plus.host_gate`);
3. eviction toward Belady under prefetch (`method.eviction=sd_lookahead`,
   `spmoe.offload.eviction_lookahead`): the draft's predictions for the coming verify step, at
   every layer (a second, prefetch-free predictor covers the layers past the cutoff), keep the
   experts about to be used;
4. union-aware adaptive draft length (`spmoe.plus.k_chooser`) through `Runtime.choose_k`;
5. optional, labelled lossy: low-precision misses (`spmoe.plus.lossy_misses`, off by default): demand
   misses past the cutoff load an int8 / int4 copy, dequantized on the device; the staging buffer
   takes its slots from the plan, and the run reports lossless=false with the reason.
The cutoff's auto profile is measured with the full-precision draft swapped back in (the profiler
scales verify time by the draft's parameter counts, which quantized sites do not have), so t_d is the
bf16 draft's; the profile is keyed on the quantized draft's name and reused by `spmoe`'s build.
Slots = the plan's + saved draft bytes // expert bytes (at most every expert) - lossy staging slots.
Without a draft (`none`, or auto's pick) the run is a no-SD offloader: the session plans it without
the draft and decodes one token per step; experts load on demand (no draft, so no predictor and no
prefetch); eviction is `method.plus.nosd_eviction` (default lru: without the draft's predictions
sd_lookahead is expected reuse over its discounted window, which moved more bytes than LRU on
DeepSeek-V2-Lite's routing, `results/spmoe_plus/deepseek_11th`); host experts and lossy misses (every
MoE layer is then past the cutoff) work as with SD; adaptive k is off.
Lossless: the draft only proposes (any precision); host experts compute the same function (CPU
float32 bit-identical; on CUDA within bf16 rounding of host vs GPU accumulation); eviction and k
change what is moved and when, never what is computed. Lossy misses are the one exception (labelled).
Extra summary keys: draft_choice, draft_choice_predicted_ms (and draft_choice_*: the model's inputs),
draft_precision, draft_saved_bytes, extra_slots, draft_agreement, host_* (host
vs GPU expert split and times), host_cost_* (profiled), host_ms_in_run / host_start_ms (the planner's in-run
cost), host_gate_* (decode steps gated off, the fitted ms per missing expert with and without the host),
chosen_k_mean / chosen_k_counts (the per-step k is the trace's num_drafted), lossy_* (part 5).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import torch

from spmoe.methods import spmoe as base
from spmoe.offload.assemble import prefetch_runtime
from spmoe.offload.budget import MemoryPlan, capped_slots
from spmoe.offload.eviction import make_policy
from spmoe.offload.eviction_lookahead import PredictionSink, SdLookaheadPolicy
from spmoe.offload.prefetch import PrefetchProvider
from spmoe.plus.draft_choice import (
    AS_CONFIGURED,
    NONE,
    DraftChoice,
    accepts_draft,
    decide,
    ranked_precisions,
)
from spmoe.plus.draft_precision import DraftPrecision, choose_precision, quantize_draft
from spmoe.plus.host_experts import (
    HostPlanner,
    HostStats,
    host_pool,
    install_host_experts,
    measure_host_cost,
)
from spmoe.plus.host_gate import GateHistory, HostGate
from spmoe.plus.k_chooser import KChooser
from spmoe.plus.lossy_misses import (
    LossyMissTransfer,
    install_lossy_misses,
    lossy_reason,
    staging_slots,
)
from spmoe.predict.draft_router import DraftRouterPredictor, is_twin
from spmoe.strategy import MethodContext, Runtime, register_strategy

log = logging.getLogger(__name__)


def _apply_draft_precision(ctx: MethodContext, choice: DraftChoice | None) -> DraftPrecision:
    pcfg = ctx.cfg.method.plus
    if ctx.cfg.draft.copy_of_target:  # already a quantized copy of the target: its precision is the draft preset's
        return DraftPrecision(AS_CONFIGURED)
    if pcfg.draft_precision != "auto":
        return quantize_draft(ctx.draft, pcfg.draft_precision, pcfg.draft_group_size)
    if ctx.routing_trace is not None and choice is not None:  # replayed acceptance: the draft's tokens do not set it
        return quantize_draft(ctx.draft, choice.choice, pcfg.draft_group_size)
    order = tuple(ranked_precisions(choice)) if choice is not None else ("int4", "int8")
    vocab = ctx.draft.config.vocab_size
    gen = torch.Generator().manual_seed(ctx.cfg.seed + 34567)  # never the evaluation prompts
    seeds = torch.randint(3, vocab, (4, 4), generator=gen).to(ctx.device)  # [B, T0]
    return choose_precision(ctx.draft, pcfg.draft_min_agreement, pcfg.draft_group_size, seeds, order=order)


def _copy_ms(runtime: Runtime, ctx: MethodContext, warmup: int = 2, reps: int = 7) -> float:
    """Time of one expert copy on the run's own link (paced when pacing is on) as the copy engine times it (CUDA
    events around each copy), which is what a demand copy adds before its layer can run: not the host's round
    trip, whose launch and sync latency the run's streamed copies do not pay (for a 17 MB expert it doubles it).
    The copies land in slot 0, which then gets back the expert it held (a cache that started full). On a paced
    link it is the emulated link's time per expert (`Pacer.link_ms`), which the run's copies achieve: the pacing
    spin runs in GPU clock cycles, so on a GPU idle at build time the calibration copies take up to twice as long."""
    store, keys, device, cache = ctx.target.store, ctx.target.layout.keys, ctx.device, runtime.cache
    pacer = getattr(runtime.transfer, "pacer", None)
    if pacer is not None:
        expert = store.flat(keys[0])
        return pacer.link_ms(expert.numel() * expert.element_size())
    held = cache.key_at(0)  # at build: the prefetch worker has no request yet

    def copies(batch: list) -> float:
        for key in batch:
            runtime.transfer.load(0, cache.slot(0), store.flat(key))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return runtime.transfer.collect().copy_ms  # calibration copies are not the run's traffic

    copies([keys[i % len(keys)] for i in range(warmup)])
    copy_ms = copies([keys[i % len(keys)] for i in range(warmup, warmup + reps)]) / reps
    if held is not None:
        copies([held])
    return copy_ms


def _lookahead_hints(ctx: MethodContext, runtime: Runtime, policy: SdLookaheadPolicy, cutoff: int, slots: int) -> None:
    """Every predictor request informs the policy; layers past the cutoff get a prediction-only predictor."""
    mcfg, layout = ctx.cfg.method, ctx.target.layout
    for listener in runtime.listeners:
        if isinstance(listener, DraftRouterPredictor):
            listener.observers.append(policy.observe)
    beyond = list(layout.moe_layers[cutoff + 1:])
    if not beyond:
        return
    maps = None if is_twin(ctx.draft, runtime.model) else base._hidden_maps(ctx, slots)
    hints = DraftRouterPredictor(ctx.draft, runtime.model, PredictionSink(policy), beyond, mcfg.capture_point,
                                 mcfg.predict_top_k or layout.top_k, maps)
    runtime.attach(hints, hints.after_draft_forward)


def _lossy_summary(ctx: MethodContext, lossy: LossyMissTransfer | None, staging: int, cutoff: int) -> dict:
    pcfg = ctx.cfg.method.plus
    if lossy is None:
        return {"lossy_misses": pcfg.lossy_misses}
    layers, computes = [k[0] for k in lossy.lowp.keys], lossy.stats.num_lossy_computes
    reason = lossy_reason(pcfg.lossy_misses, pcfg.lossy_group_size, cutoff, computes) if computes else None
    return {"lossy_misses": pcfg.lossy_misses, "lossy_reason": reason,
            "lossy_first_layer": min(layers) if layers else None, "lossy_bytes_per_expert": lossy.lowp.bytes_per_expert,
            "lossy_host_bytes": lossy.lowp.nbytes, "lossy_staging_slots": staging,
            "lossy_loads": lossy.stats.num_lossy_loads, "lossy_load_bytes": lossy.stats.lossy_load_bytes,
            "lossy_expert_computes": lossy.stats.num_lossy_computes}


def _summary(precision: DraftPrecision, extra_slots: int, stats: HostStats, planner: HostPlanner | None,
             chooser: KChooser | None, lossy: dict, inner, choice: DraftChoice | None, gate: HostGate | None) -> dict:
    total = stats.num_host_experts + stats.num_gpu_experts
    cost, times = (planner.cost, planner.times) if planner else (None, None)
    out = dict(inner() if inner else {})
    out.update(choice.summary() if choice is not None else {"draft_choice": None})
    out.update({
        "draft_precision": precision.precision, "draft_saved_bytes": precision.saved_bytes,
        "draft_agreement": precision.agreement, "draft_agreement_tried": precision.tried or None,
        "extra_slots": extra_slots,
        "host_experts": stats.num_host_experts, "gpu_experts": stats.num_gpu_experts, "host_filled": stats.num_filled,
        "host_expert_fraction": stats.num_host_experts / total if total else None,
        "host_compute_ms": stats.host_ms, "host_wait_ms": stats.wait_ms,
        "host_cost_fixed_ms": cost.fixed_ms if cost else None,
        "host_cost_per_token_ms": cost.per_token_ms if cost else None,
        "host_cost_copy_ms": cost.copy_ms if cost else None,
        "host_ms_in_run": dict(sorted(times.ms_at.items())) if times else None,
        "host_start_ms": times.start_ms if times else None,
        **(gate.summary() if gate else {"host_gate_steps_off": None}),
        **lossy,
    })
    if precision.precision == NONE:  # the run drafted nothing: no draft, k or predictor knobs apply
        out.update({"draft": None, "num_draft_tokens": None, "draft_dtype": None, "draft_quant_bits": None,
                    "capture_point": None, "predict_top_k": None})
    if chooser is not None and chooser.chosen:
        out["chosen_k_mean"] = sum(chooser.chosen) / len(chooser.chosen)
        out["chosen_k_counts"] = dict(sorted(Counter(chooser.chosen).items()))
    return out


def _slots(ctx: MethodContext, staging: int, gained: int = 0) -> tuple[MemoryPlan, int]:
    """(the plan with the run's slots: plan's + gained - staging, every expert at most; the slots the
    cache gets, under method.num_slots)."""
    plan = ctx.plan
    slots = min(plan.num_experts_total, plan.num_slots + gained) - staging
    if slots < 1:
        raise ValueError(f"lossy misses' staging buffer takes {staging} slot(s) of the {slots + staging} the budget leaves")
    plan = replace(plan, num_slots=slots)
    return plan, capped_slots(plan.num_slots, ctx.cfg.method.num_slots)


def _build_sd(ctx: MethodContext, choice: DraftChoice | None, staging: int) -> tuple[Runtime, DraftPrecision, int]:
    """SP-MoE on the (quantized) draft, with the saved bytes as slots and sd_lookahead's hints."""
    mcfg, layout = ctx.cfg.method, ctx.target.layout
    precision = _apply_draft_precision(ctx, choice)
    try:
        plan, slots = _slots(ctx, staging, precision.saved_bytes // layout.expert_bytes)
        cfg = ctx.cfg
        if precision.precision not in ("bf16", AS_CONFIGURED):  # profiles and maps are keyed on the draft
            cfg = replace(cfg, draft=replace(cfg.draft, name=f"{cfg.draft.name}-{precision.precision}"))
        sub = replace(ctx, cfg=cfg, plan=plan)
        if precision.quantized and mcfg.cutoff.mode == "auto":  # measured now, reused by base.build (same key)
            with precision.full_precision():  # the maps are fitted on the full-precision draft
                maps = None if is_twin(ctx.draft, ctx.target.model) else base._hidden_maps(sub, slots)
            # t_d of the quantized draft as it runs; t_v from the full-precision one (parameter counts)
            base.profile_record(sub, slots, maps, precision.full_precision)
        runtime = base.build(sub)
    except BaseException:
        precision.restore()
        raise
    runtime.closers.insert(0, precision.restore)  # closers run last-added first: the draft comes back last
    try:
        provider = next(l for l in runtime.listeners if isinstance(l, PrefetchProvider))
        if runtime.prefetch and isinstance(provider.cache.policy, SdLookaheadPolicy):  # a full cache never evicts
            _lookahead_hints(sub, runtime, provider.cache.policy, runtime.cutoff_layer, provider.cache.num_slots)
    except BaseException:  # the session only closes runtimes that were returned
        runtime.close()
        raise
    return runtime, precision, plan.num_slots + staging


def _build_nosd(ctx: MethodContext, staging: int) -> tuple[Runtime, DraftPrecision, int]:
    """No draft: experts on demand through the prefetch provider (no predictor), `method.plus.nosd_eviction`."""
    plan, slots = _slots(ctx, staging)
    eviction = ctx.cfg.method.plus.nosd_eviction
    runtime, _ = prefetch_runtime(ctx, make_policy(eviction, ctx.target.layout.moe_layers), slots)
    runtime.cutoff_layer = -1  # nothing is prefetched: every MoE layer is past the cutoff
    runtime.extra_summary = lambda: {"cutoff_mode": None, "cutoff_layer": None, "eviction": eviction}
    return runtime, DraftPrecision(NONE), plan.num_slots + staging


@register_strategy("spmoe_plus", offloads=True, speculative=True, accepts_draft=accepts_draft,
                   description="SP-MoE + quantized draft (or none) + CPU-assisted experts + SD-informed eviction"
                               " + adaptive k")
def build(ctx: MethodContext) -> Runtime:
    mcfg, pcfg, layout = ctx.cfg.method, ctx.cfg.method.plus, ctx.target.layout
    choice = decide(ctx.draft_offer) if ctx.draft_offer is not None else None
    if choice is not None and choice.fallback:
        log.warning("spmoe_plus: %s", choice.fallback)
    staging = 0 if pcfg.lossy_misses == "off" else staging_slots(layout, pcfg.lossy_misses, pcfg.lossy_group_size)
    if ctx.draft is None:
        runtime, precision, unstaged_total = _build_nosd(ctx, staging)
    else:
        runtime, precision, unstaged_total = _build_sd(ctx, choice, staging)
    try:
        provider = next(l for l in runtime.listeners if isinstance(l, PrefetchProvider))
        unstaged = capped_slots(unstaged_total, mcfg.num_slots)
        reference = ctx.plan.num_slots  # the plan the session made: with the draft when it drafts
        if ctx.draft is None and ctx.draft_offer is not None and ctx.draft_offer.with_draft is not None:
            reference = ctx.draft_offer.with_draft.num_slots  # none: what the draft would have left
        reference = capped_slots(reference, mcfg.num_slots)
        extra_slots = unstaged - reference  # what the draft's saved (or unused) bytes added (0 under a num_slots cap)
        lossy = None
        if pcfg.lossy_misses != "off":
            lossy = install_lossy_misses(provider, ctx.target.store, list(layout.moe_layers[runtime.cutoff_layer + 1:]),
                                         pcfg.lossy_misses, pcfg.lossy_group_size, ctx.device,
                                         ctx.cfg.hardware.host_memory_gib)
            runtime.closers.append(lossy.close)
        adaptive_k = pcfg.adaptive_k and ctx.draft is not None
        stats, cost, chooser, planner, gate = HostStats(), None, None, None, None
        if pcfg.host_compute != "off" or adaptive_k:
            copy_ms = _copy_ms(runtime, ctx)
            pool = host_pool(pcfg.host_threads)
            runtime.closers.append(pool.shutdown)
            if pcfg.host_compute == "auto":  # measured on the host worker, with its threads
                cost = pool.submit(measure_host_cost, ctx.target.store, ctx.target.act_fn, copy_ms).result()
                log.info("spmoe_plus host cost: %s", cost)
            planner = HostPlanner(provider, pcfg.host_compute, cost, pcfg.host_max_per_layer,
                                  copy_fraction=lossy.copy_fraction if lossy is not None else None,
                                  reuse=pcfg.host_reuse)
            if pcfg.host_compute == "auto":  # the run's own steps judge the host path as a whole
                gate = HostGate(planner, runtime.events, ctx.memory.setdefault("host_gate", GateHistory()))
                runtime.attach(gate)
            if adaptive_k:
                miss_ms = min(copy_ms, cost.host_ms(2)) if cost else copy_ms
                chooser = KChooser(pcfg.k_min, len(layout.moe_layers), layout.num_experts, layout.top_k, miss_ms,
                                   pcfg.accept_prior)
                runtime.choose_k = chooser
                runtime.attach(chooser)
            install_host_experts(runtime.model, layout.moe_layers, planner, ctx.target.store, pool, stats,
                                 chooser.on_layer if chooser else None, pcfg.host_fill)
        runtime.extra_summary = lambda inner=runtime.extra_summary: _summary(
            precision, extra_slots, stats, planner, chooser, _lossy_summary(ctx, lossy, staging, runtime.cutoff_layer),
            inner, choice, gate)
        log.info("spmoe_plus: draft %s (+%d slots = %d), host compute %s, eviction %s, adaptive k %s, lossy misses %s",
                 precision.precision, extra_slots, provider.cache.num_slots, pcfg.host_compute,
                 pcfg.nosd_eviction if precision.precision == NONE else mcfg.eviction,
                 adaptive_k, pcfg.lossy_misses)
    except BaseException:  # the session only closes runtimes that were returned
        runtime.close()
        raise
    return runtime
