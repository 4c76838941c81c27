"""
gpu_resident / gpu_resident_sd: every expert preloaded into device slots, served by the same
expert code as the offloaded methods; without SD it is the correctness reference and the speed
ceiling, with SD the ceiling for speculative decoding.
"""

from __future__ import annotations

from spmoe.offload.assemble import on_demand_runtime
from spmoe.strategy import MethodContext, Runtime, register_strategy


@register_strategy("gpu_resident", offloads=False, description="all experts on the device, no SD (reference)")
def build(ctx: MethodContext) -> Runtime:
    return on_demand_runtime(ctx, len(ctx.target.layout.keys), "lru", preload=True)


@register_strategy("gpu_resident_sd", offloads=False, speculative=True,
                   description="all experts on the device, with SD")
def build_sd(ctx: MethodContext) -> Runtime:
    return build(ctx)
