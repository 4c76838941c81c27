"""
lru / lru_nosd: on-demand expert loading into one global cache (all layers share the slots), no
prefetch, with / without SD: the plain offloading floor. With SD, verification needs the union
of the experts routed by its k+1 tokens, which is what SD-aware prefetching has to hide.
The eviction policy is `method.eviction` (lru by default, lfu available). The cache gets every
slot the memory plan leaves (capped by `method.num_slots`).
"""

from __future__ import annotations

from spmoe.offload.assemble import on_demand_runtime
from spmoe.offload.budget import capped_slots
from spmoe.strategy import MethodContext, Runtime, register_strategy


@register_strategy("lru_nosd", offloads=True, description="on-demand loading into an LRU expert cache, no SD")
def build(ctx: MethodContext) -> Runtime:
    return on_demand_runtime(ctx, capped_slots(ctx.plan.num_slots, ctx.cfg.method.num_slots), ctx.cfg.method.eviction)


@register_strategy("lru", offloads=True, speculative=True, description="on-demand loading into an LRU expert cache, with SD")
def build_sd(ctx: MethodContext) -> Runtime:
    return build(ctx)
