"""
accelerate: HF accelerate `device_map`-style expert offload under the same GPU budget, no SD:
the naive floor users start from.

Terms: a *layer's experts* = the whole `mlp.experts` module of one MoE layer (all E experts), the
unit accelerate places for MoE models; *resident* = placed on the device once at build time;
*offloaded* = kept on "cpu" (the ExpertStore) with execution on the device.

Faithful to HF accelerate: the placement and the moves are accelerate's own `AlignDevicesHook`
attached with `add_hook_to_module`, as `dispatch_model` does. A resident layer's hook
(`offload=False`) places its tensors on the device at attach time; an offloaded layer's hook
(`offload=True`, `weights_map` = the store's tensors) copies ALL E experts of the layer to the
device before every forward of that module (synchronously, `set_module_tensor_to_device`, with
its `empty_cache` per tensor) and drops them to `meta` after it, whichever experts were routed.
Layers are filled in order, the first ones resident, and like `infer_auto_device_map` the
device keeps room for the largest offloaded layer (one layer's experts, moved in transiently):
with S slots, E experts per layer and L MoE layers, all L are resident if S >= L*E, else the
first (S - E) // E are.

Simplified: the module holds E flat tensors (one per expert, views of the store: no second host
copy) instead of transformers' two fused `[E, ...]` tensors: same bytes, E copies instead of 2.
The experts math is `OffloadedExperts.forward` (the same code as every other method); its
provider yields the module's own per-expert tensors as the hook materialized them. The
reservation is skipped when every layer fits (accelerate would still reserve it). Hooks sit on
the experts modules only; the rest of the model is already on the device.

Stats the engine cannot see (`collect_extra`): `h2d_bytes` = every offloaded layer's E experts
per forward of that layer (counted on CPU too, where `.to("cpu")` moves nothing); `copy_ms` =
wall time of the hook's `pre_forward` (device synchronized before and after on CUDA), and
`stall_ms` the same, since accelerate's copies block compute. Events: routed experts are hits
on resident layers, misses on offloaded ones.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
from accelerate.hooks import (
    AlignDevicesHook,
    add_hook_to_module,
    remove_hook_from_module,
)
from torch import nn

from spmoe.models.experts import OffloadedExperts
from spmoe.offload.transfer import TransferStats
from spmoe.strategy import MethodContext, Runtime, register_strategy
from spmoe.trace.records import ExpertEventLog


def resident_layer_count(num_slots: int, num_experts: int, num_layers: int) -> int:
    """How many leading MoE layers keep their experts on the device (see the module docstring)."""
    if num_slots >= num_layers * num_experts:
        return num_layers
    return max(0, (num_slots - num_experts) // num_experts)


def _param_name(expert: int) -> str:
    return f"expert_{expert}"


class _ModuleTensors:
    """ExpertProvider over one experts module's own per-expert tensors (as accelerate placed them)."""

    def __init__(self, module: nn.Module, events: ExpertEventLog, offloaded: bool):
        self.module, self.events, self.offloaded = module, events, offloaded

    def experts_for(self, layer: int, expert_ids: list[int], token_experts=None) -> Iterator[tuple[int, torch.Tensor]]:
        ids = list(expert_ids)
        self.events.record(layer, ids, [] if self.offloaded else ids, ids if self.offloaded else [])
        for e in ids:
            yield e, self.module._parameters[_param_name(e)]


class _CountingHook(AlignDevicesHook):
    """accelerate's AlignDevicesHook, counting the bytes and time of its per-forward moves."""

    def __init__(self, stats: TransferStats, nbytes: int, **kwargs):
        super().__init__(**kwargs)
        self.stats, self.nbytes = stats, nbytes
        self.cuda = torch.device(kwargs["execution_device"]).type == "cuda"

    def pre_forward(self, module, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize(self.execution_device)
        t0 = time.perf_counter()
        out = super().pre_forward(module, *args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize(self.execution_device)
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.h2d_bytes += self.nbytes
        self.stats.copy_ms += ms
        self.stats.stall_ms += ms
        return out


@register_strategy("accelerate", offloads=True,
                   description="HF accelerate device_map offload: first layers' experts resident, the rest moved whole per forward")
def build(ctx: MethodContext) -> Runtime:
    model, layout, store, device = ctx.target.model, ctx.target.layout, ctx.target.store, ctx.device
    layers = list(layout.moe_layers)
    n_resident = resident_layer_count(ctx.plan.num_slots, layout.num_experts, len(layers))
    events, pending = ExpertEventLog(), TransferStats()  # accumulated by the hooks, drained by collect_extra
    originals: dict[int, nn.Module] = {}
    hooked: list[nn.Module] = []
    for rank, idx in enumerate(layers):
        mlp = model.model.layers[idx].mlp
        originals[idx] = mlp.experts
        offloaded = rank >= n_resident
        module = OffloadedExperts(idx, layout, mlp.experts.act_fn, provider=None)
        views = {_param_name(e): store.flat((idx, e)) for e in range(layout.num_experts)}
        for name, view in views.items():  # the store's own tensors: no second host copy
            module.register_parameter(name, nn.Parameter(view, requires_grad=False))
        module.provider = _ModuleTensors(module, events, offloaded)
        if offloaded:
            hook = _CountingHook(pending, layout.num_experts * layout.expert_bytes, execution_device=device,
                                 offload=True, weights_map=views)
        else:
            hook = AlignDevicesHook(execution_device=device)  # places the tensors on the device now (not counted)
        add_hook_to_module(module, hook)
        mlp.experts = module
        hooked.append(module)

    def collect_extra() -> TransferStats:
        out = TransferStats(pending.h2d_bytes, pending.copy_ms, pending.stall_ms)
        pending.h2d_bytes, pending.copy_ms, pending.stall_ms = 0, 0.0, 0.0
        return out

    def close() -> None:
        for module in hooked:
            remove_hook_from_module(module)
            module._parameters.clear()  # drops the device copies of resident layers
            module.provider = None
        for idx, experts in originals.items():
            model.model.layers[idx].mlp.experts = experts
        hooked.clear()
        originals.clear()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()

    return Runtime(model=model, events=events, collect_extra=collect_extra, closers=[close])
