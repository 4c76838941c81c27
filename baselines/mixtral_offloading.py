"""
mixtral_offloading / mixtral_offloading_nosd: Eliseev & Mazur 2023 ("Fast Inference of
Mixture-of-Experts Language Models with Offloading", arXiv 2312.17238), with / without SD.

Two mechanisms, assembled from the shared components:
1. **Per-layer LRU expert cache.** Every MoE layer is its own eviction group with a fixed number
   of device slots (`ExpertCache(..., slots_per_layer=...)`): the memory plan's slots (capped by
   `method.num_slots`) split evenly over the MoE layers, the remainder on the first layers. A
   layer's misses only ever evict that layer's experts (`method.eviction`, lru as in the paper).
2. **Speculative expert loading.** While the target computes layer l, its router input (the
   normalized FFN input of layer l) goes through the router of the next MoE layer l+1
   (`GateLookaheadPredictor`, depth 1); the top_k experts it names (`method.predict_top_k`,
   default the target's top_k) are prefetched into layer l+1's slots by a `PrefetchProvider`
   (copy stream + worker thread, `method.worker_thread` / `batched_io` / `timeout_s`). The
   residual stream changes little between adjacent layers, which is what makes the guess work.
   With SD (`mixtral_offloading`) the same hook runs inside the verify forward: layer l's k+1
   hidden states predict k+1 rows for layer l+1, whose union is prefetched; the draft is the
   session's draft, the same for every SD method. Not attached when every expert is resident
   (`spmoe.offload.assemble`).

Faithful to the paper: per-layer LRU groups of equal size; next-layer gate applied to the current
hidden state; speculative loads go into the same LRU cache as demand loads (a wrong guess costs a
copy and one eviction in that layer); copies overlap the current layer's compute.
Simplified or changed, and why:
- No HQQ quantization (2/3-bit experts, 4-bit attention): every method is compared at the same
  16-bit weights, so only the offloading policy differs. The paper's per-layer slot count came
  from what fits after quantization; here it comes from the shared memory plan.
- Slots are the memory plan's (same budget accounting as every method) rather than the repo's
  `offload_per_layer`; experts are one flat buffer each (the repo packs them into one storage too).
- Prediction is a router pre-hook on layer l (the router input, after the layer's attention and
  post-attention norm), not the layer's output hidden state: it is the earliest point where the
  copy can overlap layer l's expert compute, and the paper's "hidden state of layer l" is the
  residual stream at that layer either way.
- Prefetched experts of layer l+1 are protected from eviction until verification reaches layer
  l+1 (the provider's rule, shared with SP-MoE); the repo has no speculative loading at all
  (listed as work in progress), so this part follows the paper's description only.
- The first MoE layer is never predicted (nothing precedes it), exactly as in the paper.
"""

from __future__ import annotations

from spmoe.offload.assemble import prefetch_runtime
from spmoe.offload.budget import capped_slots
from spmoe.offload.eviction import make_policy
from spmoe.predict.gate_lookahead import GateLookaheadPredictor
from spmoe.strategy import MethodContext, Runtime, register_strategy


def split_slots(total: int, moe_layers: tuple[int, ...] | list[int], num_experts: int) -> dict[int, int]:
    """`total` slots split evenly over `moe_layers` (remainder on the first layers), at most
    `num_experts` per layer: {layer: slots}."""
    layers = list(moe_layers)
    total = min(total, len(layers) * num_experts)
    if total < len(layers):
        raise ValueError(f"mixtral_offloading keeps a per-layer cache with at least 1 slot per MoE layer: "
                         f"{total} expert slots for {len(layers)} MoE layers is too few (raise method.num_slots"
                         f" or the GPU budget to at least {len(layers)})")
    base, extra = divmod(total, len(layers))
    return {layer: base + int(i < extra) for i, layer in enumerate(layers)}


def _build(ctx: MethodContext) -> Runtime:
    mcfg, layout = ctx.cfg.method, ctx.target.layout
    slots = capped_slots(ctx.plan.num_slots, mcfg.num_slots)
    per_layer = split_slots(slots, layout.moe_layers, layout.num_experts)
    total = sum(per_layer.values())
    runtime, provider = prefetch_runtime(ctx, make_policy(mcfg.eviction, layout.moe_layers), total, per_layer)
    runtime.slots_per_layer = per_layer
    if runtime.prefetch:  # off when every expert is resident (spmoe.offload.assemble)
        predictor = GateLookaheadPredictor(runtime.model, provider, layout.moe_layers,
                                           mcfg.predict_top_k or layout.top_k, depth=1)
        runtime.attach(predictor)
    return runtime


@register_strategy("mixtral_offloading", offloads=True, speculative=True,
                   description="SD + per-layer LRU cache + next-layer gate lookahead prefetch (Eliseev & Mazur)")
def build(ctx: MethodContext) -> Runtime:
    return _build(ctx)


@register_strategy("mixtral_offloading_nosd", offloads=True,
                   description="per-layer LRU cache + next-layer gate lookahead prefetch, no SD (Eliseev & Mazur)")
def build_nosd(ctx: MethodContext) -> Runtime:
    return _build(ctx)
