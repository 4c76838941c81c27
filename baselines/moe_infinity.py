"""
moe_infinity / moe_infinity_nosd: MoE-Infinity (Xue, Fu, Lu, Mai, Marina; arXiv 2401.14361,
"Efficient MoE Inference on Personal Machines with Sparsity-Aware Expert Cache" in v3), with /
without SD, re-implemented on the shared components.

Three mechanisms:
1. **Expert activation tracing and matching** (`spmoe.predict.activation_matrix`): the current
   sequence's Expert Activation Matrix (MoE layers x experts counts) is matched, at every MoE
   layer of every target forward, against a bounded collection of past sequences' EAMs by
   per-layer cosine similarity; the best match's counts for the next `depth` = 3 MoE layers,
   weighted by the linear layer decay, choose what to prefetch (at most `method.predict_top_k`
   experts per layer, default 2 x the target's top_k, and at most `budget` = max(top_k,
   slots // 2) per prediction), nearer layers first. A finished sequence joins the collection
   when the next one starts (the target is called with an empty KV cache).
2. **Priority expert cache** (`spmoe.offload.eviction_priority.PriorityPolicy`): one global
   pool; the victim is the expert with the lowest frequency x current-sequence-EAM x
   layer-proximity score (the layer just computed ranks lowest, the next layers highest).
   `method.eviction` is not read: the policy is the method.
3. **Warm start from traces**: the collection can be seeded with one EAM per prompt from earlier
   runs' `trace.jsonl` (`trace_path`: a path or a list of paths), kept as persistent entries
   (never replaced), as the reference's `trace_path` option. The collection holds the warm
   entries plus `DEFAULT_CAPACITY` (64) live ones.
Prefetches go through the shared `PrefetchProvider` (copy stream + worker thread,
`method.worker_thread` / `batched_io` / `timeout_s`); with SD (`moe_infinity`) the prediction runs
inside the verify forward and at the start of each step (the first layers, while the draft runs),
with the session's draft and k, the same for every SD method. MoE-Infinity itself has no
SD-aware prediction: its traces simply see the verify forwards' union of experts. When every expert
is resident nothing is traced or prefetched (`spmoe.offload.assemble`): there is nothing to load or evict.

Faithful to the paper / reference code (`moe_infinity/memory/*`): EAM per sequence, EAMC with
persistent warm entries and least-accessed replacement, cosine matching per layer, decayed
priorities for upcoming layers, priority-ordered prefetch, the three-factor cache priority.
Simplified or changed, and why:
- One tier (pinned host -> GPU slots under the shared memory plan); the SSD tier, the C++
  engine and its caching allocators are out of scope: every method shares the same transfer
  code so that only the policies differ.
- EAM counts are per forward (union of its tokens), not per token, so EAMs built from trace files
  (which record the union per step) and live EAMs count alike.
- Prefetch is bounded (depth, width, budget) instead of enqueueing every non-zero expert of all
  remaining layers: the shared provider protects prefetched experts until their layer runs, so
  an unbounded list would pin the whole cache.
- Details of smoothing, matching mask and scoring are in the two modules' docstrings.
`trace_path` is read from `method.trace_path` (or the build function's keyword argument).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from spmoe.offload.assemble import prefetch_runtime
from spmoe.offload.budget import capped_slots
from spmoe.offload.eviction_priority import PriorityPolicy
from spmoe.predict.activation_matrix import (
    DEFAULT_CAPACITY,
    DEFAULT_DEPTH,
    EamCollection,
    EamPredictor,
    load_trace_eams,
)
from spmoe.strategy import MethodContext, Runtime, register_strategy

log = logging.getLogger(__name__)


def warm_eams(trace_path, moe_layers: tuple[int, ...], num_experts: int) -> list[torch.Tensor]:
    """EAMs of every prompt in the given trace file(s) (`str | Path | list` of them, or None)."""
    if trace_path is None:
        return []
    paths = [trace_path] if isinstance(trace_path, (str, Path)) else list(trace_path)
    eams: list[torch.Tensor] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "trace.jsonl"
        if not path.is_file():
            raise ValueError(f"moe_infinity trace_path {str(path)!r} is not a trace.jsonl file (or a run directory"
                             " holding one)")
        eams += load_trace_eams(path, moe_layers, num_experts)
    return eams


def build(ctx: MethodContext, trace_path=None) -> Runtime:
    mcfg, layout = ctx.cfg.method, ctx.target.layout
    trace_path = trace_path if trace_path is not None else mcfg.trace_path
    slots = capped_slots(ctx.plan.num_slots, mcfg.num_slots)
    num_layers, num_experts = len(layout.moe_layers), layout.num_experts
    warm = warm_eams(trace_path, layout.moe_layers, num_experts)  # bad paths fail before anything is allocated
    policy = PriorityPolicy(layout.moe_layers, num_experts)
    runtime, provider = prefetch_runtime(ctx, policy, slots)  # installs the experts before the hooks below
    runtime.predictor = None
    if not runtime.prefetch:  # every expert is resident (spmoe.offload.assemble): no tracing, nothing to evict
        return runtime
    model = runtime.model

    collection = EamCollection(num_layers, num_experts, capacity=len(warm) + DEFAULT_CAPACITY)
    for eam in warm:
        collection.add(eam, persistent=True)
    if warm:
        log.info("moe_infinity: warmed the EAM collection with %d traces from %s", len(collection), trace_path)
    width = min(num_experts, mcfg.predict_top_k or 2 * layout.top_k)
    budget = min(width * DEFAULT_DEPTH, max(layout.top_k, slots // 2))

    def on_layer(layer: int, experts: list[int]) -> None:
        policy.set_layer(layer)
        policy.record(layer, experts)

    predictor = EamPredictor(model, provider, layout.moe_layers, num_experts, collection, width, budget,
                             DEFAULT_DEPTH, on_layer=on_layer, on_new_sequence=policy.new_sequence)
    runtime.attach(predictor)
    runtime.predictor = predictor  # for tests and analysis: the collection and match history
    return runtime


@register_strategy("moe_infinity", offloads=True, speculative=True,
                   description="SD + activation-matrix (EAM) trace-matching prefetch + priority expert cache")
def build_sd(ctx: MethodContext) -> Runtime:
    return build(ctx)


@register_strategy("moe_infinity_nosd", offloads=True,
                   description="activation-matrix (EAM) trace-matching prefetch + priority expert cache, no SD")
def build_nosd(ctx: MethodContext) -> Runtime:
    return build(ctx)
