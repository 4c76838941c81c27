"""
The engine's experts module, installed in place of transformers' fused `mlp.experts`.

transformers' MoE blocks call `experts(hidden_states [T, H], top_k_index [T, A], top_k_weights
[T, A])`; `OffloadedExperts` has that signature and asks an `ExpertProvider` for each routed
expert's weights, so the same expert code serves every method (GPU-resident, offloaded,
prefetched). Weights of one expert live in one flat buffer of `ExpertLayout.expert_numel`
elements: `gate_up [2I, H]` (gate rows, then up rows) followed by `down [H, I]`, exactly the
per-expert slices of transformers' fused `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`.

A route to an id outside [0, E) (transformers' "no expert" sentinel E, used by adaptive gating)
contributes nothing and loads nothing.

Two ways to compute a layer:
- per expert (any provider): the routes go to the host (one device->host sync per layer, since
  copies are issued from the CPU), and the provider yields each routed expert's weights, which
  are valid until the consumer resumes it (a slot may be reused afterwards). Where the grouped
  GEMM is supported, each expert runs through it as a one-group problem (`slot_expert_mlp`), so
  every method's expert math rounds like the grouped path's;
- grouped (providers with `serve_resident`, when the cache holds every expert for good, e.g. the
  GPU-resident reference): routes are mapped to slots on the device and the layer's experts run
  as two grouped matmuls over the cache's slot storage (`grouped_expert_mlp`), with no host sync,
  so the host can run ahead of the device. Used where `grouped_supported` (CPU; CUDA bf16 on
  sm90+, torch's grouped GEMM); elsewhere, and when `OffloadedExperts.grouped` is False, per expert;
- on the provider's device (providers with `device_routes`, a quantized draft's resident experts): the
  provider computes every route's output from the device routes itself, no host sync;
- layer-grouped (offloading providers with `serve_layer`): the routes go to the host as per expert,
  the provider pins every routed expert of the layer at once (issuing the misses' copies) and hands
  back a slot map; the layer runs as the same grouped matmuls over the span of the cache's slots
  it uses, the compute stream waiting on the copies' events. When the misses outnumber the slots that can be
  freed at once, the provider hands back its per-expert iterator instead. Where grouped is used,
  unless `OffloadedExperts.layer_grouped` is False.

Invariant: the output does not depend on the order in which the provider yields experts:
each expert writes its own (token, slot) rows of a [T, A, H] buffer, and the weighted sum over
A runs in a fixed order afterwards. So methods that load experts in different orders produce
bit-identical results. The grouped path computes each route's rows with the same products
(bit-identical on the CPU; on CUDA another GEMM kernel, so bf16 results may differ in rounding).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from spmoe.hooks import is_graph_safe
from spmoe.offload.layer_slots import LayerSlots
from spmoe.runtime import moe_gemv
from spmoe.runtime.streams import capturing
from spmoe.types import ExpertKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes of a model's routed experts. T = tokens, H = hidden, I = expert intermediate, A = top-k."""

    moe_layers: tuple[int, ...]  # decoder-layer indices that have routed experts
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype

    @property
    def expert_numel(self) -> int:
        return 3 * self.intermediate_size * self.hidden_size

    @property
    def expert_bytes(self) -> int:
        return self.expert_numel * torch.finfo(self.dtype).bits // 8

    @property
    def keys(self) -> list[ExpertKey]:
        return [(layer, e) for layer in self.moe_layers for e in range(self.num_experts)]

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's flat buffer -> (gate_up [2I, H], down [H, I]) views."""
        h, i = self.hidden_size, self.intermediate_size
        return flat[: 2 * i * h].view(2 * i, h), flat[2 * i * h :].view(h, i)


class ExpertProvider(Protocol):
    def experts_for(self, layer: int, expert_ids: list[int], token_experts: torch.Tensor | None = None,
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (expert, flat weights on the compute device) for each id, in any order.

        `token_experts` [T, A] (host) are the per-token routes, for predictors' accuracy stats.
        The weights are valid until the consumer resumes the iterator."""
        ...


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """x [N, H] -> [N, H]: act(x W_gate^T) * (x W_up^T) W_down^T, as transformers' eager experts."""
    gate, up = nn.functional.linear(x, gate_up).chunk(2, dim=-1)  # [N, I] each
    return nn.functional.linear(act_fn(gate) * up, down)


_ONE_GROUP: dict[tuple[int, torch.device], torch.Tensor] = {}


def slot_expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """`expert_mlp` through the grouped path's kernels, over this one slot (decode shapes on CUDA: the
    Triton kernels of `spmoe.runtime.moe_gemv`; else torch's grouped GEMM with one group), so an
    expert's rows round as they do there (bf16 results of every method agree with the GPU-resident
    reference's). x [M, H] -> [M, H]; gate_up [2I, H] and down [H, I] views of one slot."""
    rows = x.shape[0]
    if moe_gemv.supports(x, act_fn):
        (two_i, h), numel = gate_up.shape, gate_up.numel() + down.numel()
        assert down.storage_offset() == gate_up.storage_offset() + two_i * h, "gate_up and down of one slot buffer"
        flat = gate_up.as_strided((1, numel), (numel, 1), gate_up.storage_offset())  # [1, N]: the slot
        return moe_gemv.one_slot_mlp(x, flat, two_i // 2)  # [M, H]
    offs = _ONE_GROUP.get((rows, x.device))
    if offs is None:
        offs = _ONE_GROUP[(rows, x.device)] = torch.tensor([rows], dtype=torch.int32, device=x.device)  # [1]
    mm = _grouped_mm_fn()
    (two_i, h), i = gate_up.shape, down.shape[1]
    gate_up_t = gate_up.as_strided((1, h, two_i), (two_i * h, 1, h), gate_up.storage_offset())  # [1, H, 2I]
    down_t = down.as_strided((1, i, h), (h * i, 1, i), down.storage_offset())  # [1, I, H]
    gate, up = mm(x.contiguous(), gate_up_t, offs=offs).chunk(2, dim=-1)  # [M, I] each
    return mm(act_fn(gate) * up, down_t, offs=offs)  # [M, H]


class OffloadedExperts(nn.Module):
    """Drop-in for transformers' fused experts module; weights come from `provider`."""

    def __init__(self, layer_idx: int, layout: ExpertLayout, act_fn: nn.Module, provider: ExpertProvider):
        super().__init__()
        self.layer_idx = layer_idx
        self.layout = layout
        self.act_fn = act_fn
        self.provider = provider
        self.seam_hooks: list[SeamHook] = []  # see `on_experts_call`

    grouped: bool = True  # use the grouped path when the provider offers it (a switch for A/B timing)
    layer_grouped: bool = True  # offloaded layers too, through `serve_layer` (a switch for A/B timing)
    graph_experts: bool = True  # piecewise replays run a pinned layer's expert kernels as a CUDA graph (A/B switch)
    route_sync_s: float = 0.0  # host seconds spent in the routes' device->host copy (waiting on the device)
    # set on instances only while a piecewise CUDA graph is captured (spmoe.runtime.piecewise): forward hands
    # the call to it, which ends the captured segment and runs `compute` eagerly (a dry capture: zeros)
    segment: Callable | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.segment is not None:  # a piecewise capture's (spmoe.runtime.piecewise)
            return self.segment(self, hidden_states, top_k_index, top_k_weights)
        self.run_seam_hooks(hidden_states, top_k_index, top_k_weights)
        return self.compute(hidden_states, top_k_index, top_k_weights)

    def run_seam_hooks(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Run the seam hooks (see `on_experts_call`); inside a CUDA graph capture only graph-safe ones may run."""
        if self.seam_hooks and capturing(hidden_states.device) and not all(is_graph_safe(h) for h in self.seam_hooks):
            raise RuntimeError(f"seam hooks of MoE layer {self.layer_idx} do host work (syncs, pinned buffers) and must"
                               " not run inside a CUDA graph capture: capture this forward piecewise")
        for hook in self.seam_hooks:
            hook(hidden_states, top_k_index, top_k_weights)

    def compute(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                site: ExpertsSite | None = None) -> torch.Tensor:
        """[T, H]: the routed experts' weighted sum for hidden_states [T, H] and routes [T, A]. `site`: the
        piecewise graph's call site when these are its static tensors; a layer whose experts are all
        pinned then runs its expert kernels through `site.run` (a CUDA graph of them)."""
        # T = tokens, A = experts per token, H = hidden
        ys = self._device_routes(hidden_states, top_k_index)
        if ys is not None:
            return combine_routes(ys, top_k_weights, self.act_fn)  # [T, H]
        table = self._resident_table(hidden_states, top_k_index)
        if table is None and site is not None and self.graph_experts and self._kernels(hidden_states):
            return self._graphed(hidden_states, top_k_index, top_k_weights, site)
        return combine_routes(self._outputs(hidden_states, top_k_index, table), top_k_weights, self.act_fn)  # [T, H]

    def route_outputs(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """[T, A, H]: every route's expert output, as `compute` gets them outside a piecewise call site."""
        ys = self._device_routes(hidden_states, top_k_index)
        if ys is not None:
            return ys
        return self._outputs(hidden_states, top_k_index, self._resident_table(hidden_states, top_k_index))

    def _device_routes(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor | None:
        """[T, A, H] from a provider that computes routes on the device itself (`device_routes`, e.g. a quantized
        draft's resident experts), where it serves this shape; else None."""
        serve = getattr(self.provider, "device_routes", None)
        return None if serve is None else serve(self.layer_idx, hidden_states, top_k_index, self.act_fn)

    def _resident_table(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor):
        """The provider's slot table when the cache holds every expert for good and the grouped path serves."""
        serve = getattr(self.provider, "serve_resident", None)
        if serve is not None and self.grouped and grouped_supported(hidden_states):
            return serve(self.layer_idx, top_k_index)
        return None

    def _outputs(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, table) -> torch.Tensor:
        """[T, A, H]: over the resident `table` in one grouped matmul, else served by the provider."""
        if table is not None:
            return grouped_expert_mlp(hidden_states, top_k_index, *table, self.layout, self.act_fn)
        return self._per_expert(hidden_states, top_k_index)

    def _graphed(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 site: ExpertsSite) -> torch.Tensor:
        """`compute` at a piecewise call site: a layer whose experts are all pinned runs its kernels and
        the routes' sum through `site.run` (static addresses: the whole storage, the layer's map row)."""
        return self._graphed_served(hidden_states, top_k_index, top_k_weights, site,
                                    *self._serve(hidden_states, top_k_index))

    def _graphed_served(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        site: ExpertsSite, index_cpu: torch.Tensor,
                        served: LayerSlots | Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """`_graphed` once the provider has served the layer (`_serve`'s pair)."""
        if not isinstance(served, LayerSlots) or not served.static:
            return combine_routes(self._routes(hidden_states, top_k_index, index_cpu, served), top_k_weights, self.act_fn)
        try:
            storage, slot_of = served.view(whole=True)
            return site.run(lambda: combine_routes(grouped_expert_mlp(
                hidden_states, top_k_index, storage, slot_of, self.layout, self.act_fn), top_k_weights, self.act_fn))
        finally:
            served.release()

    def sync_free(self, device: torch.device) -> bool:
        """Whether `forward` on `device` runs without a device->host sync: the grouped path over the slot
        table of a provider whose cache can no longer change (providers with `serve_resident` keep
        it as `resident`, a `spmoe.runtime.resident.ResidentTable`), so a CUDA graph can capture it."""
        if getattr(self.provider, "device_routes", None) is not None:
            return True  # serves every decode shape on the device (T <= its limit, above every captured shape)
        probe = torch.empty(0, dtype=self.layout.dtype, device=device)
        return (self.grouped and getattr(self.provider, "serve_resident", None) is not None
                and grouped_supported(probe) and self.holds_all())

    def holds_all(self) -> bool:
        """Whether the provider's cache holds this layer's experts for good (its `resident` table), without
        serving anything (no events recorded)."""
        resident = getattr(self.provider, "resident", None)
        return resident is not None and resident.get(self.layer_idx) is not None

    def _per_expert(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """[T, A, H]: each route's expert output, served by the provider (see `_serve`)."""
        return self._routes(hidden_states, top_k_index, *self._serve(hidden_states, top_k_index))

    def _routes(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, index_cpu: torch.Tensor,
                served: LayerSlots | Iterator[tuple[int, torch.Tensor]], whole: bool | None = None) -> torch.Tensor:
        """[T, A, H] from the provider's service: one grouped matmul over `LayerSlots` (over the whole storage
        when `whole`, default: where the Triton kernels serve; see `LayerSlots.view`), else one expert at a time."""
        if not isinstance(served, LayerSlots):
            return expert_by_expert(hidden_states, index_cpu, served, self.layout, self.act_fn)
        try:
            storage, slot_of = served.view(whole=self._kernels(hidden_states) if whole is None else whole)
            return grouped_expert_mlp(hidden_states, top_k_index, storage, slot_of, self.layout, self.act_fn)
        finally:
            served.release()

    def _kernels(self, hidden_states: torch.Tensor) -> bool:
        """Whether the Triton decode kernels serve this layer's experts (they work per route: whole storage)."""
        return moe_gemv.supports(hidden_states, self.act_fn)

    def _serve(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
               ) -> tuple[torch.Tensor, LayerSlots | Iterator[tuple[int, torch.Tensor]]]:
        """(routes [T, A] on the host, the provider's service): a provider with `serve_layer` that can pin
        all of the layer's experts at once gives `LayerSlots` (one grouped matmul over its cache's slots,
        `spmoe.offload.layer_slots`); any other case an iterator of the experts one at a time."""
        # NOTE: one device->host sync per layer: the copies are issued from the CPU, so it must know the ids.
        t0 = time.perf_counter()
        index_cpu = top_k_index.cpu()  # [T, A]
        self.route_sync_s += time.perf_counter() - t0
        return index_cpu, self._provide(hidden_states, routed_ids(index_cpu, self.layout.num_experts), index_cpu)

    def _provide(self, hidden_states: torch.Tensor, expert_ids: list[int], index_cpu: torch.Tensor,
                 ) -> LayerSlots | Iterator[tuple[int, torch.Tensor]]:
        """The provider's service of `expert_ids`: `serve_layer` where the grouped path serves, else `experts_for`."""
        serve = getattr(self.provider, "serve_layer", None)
        if serve is not None and self.grouped and self.layer_grouped and grouped_supported(hidden_states):
            return serve(self.layer_idx, expert_ids, index_cpu)
        return self.provider.experts_for(self.layer_idx, expert_ids, index_cpu)


def routed_ids(index_cpu: torch.Tensor, num_experts: int) -> list[int]:
    """The distinct experts routes [T, A] on the host name, sorted; ids outside [0, E) mean "no expert"
    (transformers' sentinel is E; adaptive gating uses it)."""
    return list(routed_tokens(index_cpu, num_experts))


def routed_tokens(index_cpu: torch.Tensor, num_experts: int) -> dict[int, int]:
    """Routes [T, A] on the host as expert -> its routed tokens (a token's ids are distinct), ascending expert
    ids, routed experts only (see `routed_ids`), from one `tolist`."""
    counts: dict[int, int] = {}
    for e in index_cpu.flatten().tolist():
        if 0 <= e < num_experts:
            counts[e] = counts.get(e, 0) + 1
    return dict(sorted(counts.items()))


SeamHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class _SeamHandle:
    def __init__(self, hooks: list, hook: SeamHook):
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def on_experts_call(experts: nn.Module, hook: SeamHook):
    """Call `hook(hidden_states [T, H], top_k_index [T, A], top_k_weights [T, A])` before every call of the
    experts module, for host work that reads the call's inputs without changing them (predict, prefetch):
    a handle with `remove()`. On an engine `OffloadedExperts` it is a *seam hook*, run eagerly at the
    experts call, so piecewise CUDA graphs (which run the experts eagerly between captured segments,
    `spmoe.runtime.piecewise`) keep it on every replay; elsewhere a forward pre-hook (an eager forward).
    A seam hook never runs inside a CUDA graph capture unless marked graph-safe (`spmoe.hooks.mark_graph_safe`:
    device work only, on static addresses), which a whole-step graph may then capture."""
    if isinstance(experts, OffloadedExperts):
        experts.seam_hooks.append(hook)
        return _SeamHandle(experts.seam_hooks, hook)
    return experts.register_forward_pre_hook(lambda m, args: hook(*args[:3]))


class ExpertsSite(Protocol):
    """A piecewise graph's experts call site (`spmoe.runtime.piecewise.ExpertsGraph`)."""

    def run(self, layer: Callable[[], torch.Tensor]) -> torch.Tensor: ...


def expert_by_expert(hidden_states: torch.Tensor, index_cpu: torch.Tensor, experts: Iterator[tuple[int, torch.Tensor]],
                     layout: ExpertLayout, act_fn: nn.Module) -> torch.Tensor:
    """[T, A, H]: each route's expert output, the experts computed one at a time as `experts` yields
    them (expert id, flat weights valid until the iterator is resumed); routes [T, A] on the host."""
    num_tokens, top_k = index_cpu.shape  # R = T * A routes
    sorted_ids, order = torch.sort(index_cpu.flatten(), stable=True)  # [R]: routes grouped by expert, row-major within
    ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    span = {e: (end - n, end) for e, n, end in zip(ids.tolist(), counts.tolist(), ends) if 0 <= e < layout.num_experts}
    ys = hidden_states.new_zeros(num_tokens, top_k, hidden_states.shape[-1])  # [T, A, H]
    mlp = slot_expert_mlp if grouped_supported(hidden_states) else expert_mlp
    if num_tokens > 1:
        order_d = order.to(hidden_states.device)  # one host->device copy per layer, sliced per expert
        rows_all, pos_all = order_d // top_k, order_d % top_k  # [R] each
    for e, flat in experts:
        gate_up, down = layout.split(flat)
        start, end = span[e]
        if num_tokens == 1:
            ys[0, int(order[start])] = mlp(hidden_states, gate_up, down, act_fn)[0]
        else:
            rows_d, pos_d = rows_all[start:end], pos_all[start:end]
            ys[rows_d, pos_d] = mlp(hidden_states[rows_d], gate_up, down, act_fn)
    return ys


def combine_routes(ys: torch.Tensor, weights: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """[T, H]: the routes' outputs ys [T, A, H] weighted by weights [T, A], summed in float32 in a fixed
    order over A, in ys's dtype: one kernel where the expert kernels serve (`moe_gemv.combine`)."""
    if moe_gemv.supports(ys, act_fn):  # ys [T, A, H]: the same T, device and dtype test as its inputs'
        return moe_gemv.combine(ys, weights)
    return (ys.float() * weights.float()[..., None]).sum(dim=1).to(ys.dtype)  # [T, H], fixed summation order


def _grouped_mm_fn():
    return getattr(nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_supported(x: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM serves x's device and dtype (CPU: any float; CUDA: bf16 on sm90+),
    checked once per device type and dtype on a small problem with the slot layout."""
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_OK:
        ok = _grouped_mm_fn() is not None and (x.device.type == "cpu" or (
            x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)))
        _GROUPED_OK[key] = ok and _probe(x.device, x.dtype)
    return _GROUPED_OK[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """A 3-slot problem through `grouped_expert_mlp` against the per-expert math (relative error < 2%)."""
    layout = ExpertLayout((0,), 3, 2, 64, 32, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    storage = (torch.randn(3, layout.expert_numel, generator=gen) * 0.1).to(device=device, dtype=dtype)  # [S, N]
    x = torch.randn(3, 64, generator=gen).to(device=device, dtype=dtype)  # [T, H]
    index = torch.tensor([[0, 2], [2, 1], [0, 1]], device=device)  # [T, A]
    slot_of = torch.tensor([2, 0, 1], device=device)  # [E]
    act = nn.SiLU()
    try:
        got = grouped_expert_mlp(x, index, storage, slot_of, layout, act).float()  # [T, A, H]
        one = slot_expert_mlp(x, *layout.split(storage[1]), act).float()  # [T, H]
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        log.warning("grouped expert matmul unavailable on %s %s (%s); experts run one at a time", device.type, dtype, exc)
        return False
    want = torch.stack([torch.stack([expert_mlp(x[t:t + 1], *layout.split(storage[int(slot_of[int(e)])]), act)[0]
                                     for e in index[t]]) for t in range(3)]).float()  # [T, A, H]
    want_one = expert_mlp(x, *layout.split(storage[1]), act).float()  # [T, H]
    ok = bool(((got - want).norm() <= 0.02 * want.norm()).item() and
              ((one - want_one).norm() <= 0.02 * want_one.norm()).item())
    if not ok:
        log.warning("grouped expert matmul disagrees with the per-expert math on %s %s; experts run one at a time",
                    device.type, dtype)
    return ok


MAX_GROUPS = 1023  # torch's CUDA grouped GEMM requires fewer than 1024 groups per call


def grouped_expert_mlp(x: torch.Tensor, top_k_index: torch.Tensor, storage: torch.Tensor, slot_of: torch.Tensor,
                       layout: ExpertLayout, act_fn: nn.Module) -> torch.Tensor:
    """Every route's expert output [T, A, H] as two grouped matmuls over the slots, all on the device.

    x [T, H]; top_k_index [T, A] expert ids in [0, E] (E, transformers' "no expert", gives a zero
    row); storage [S, N] slot buffers (gate_up [2I, H] then down [H, I] each); slot_of [E] or [E + 1]
    the slot of each expert in storage (entry E, any slot, serves the "no expert" routes). Decode
    shapes on CUDA run the Triton kernels (`spmoe.runtime.moe_gemv`); otherwise routes are sorted by
    slot and group g of torch's grouped matmul is slot g (empty groups cost nothing), in chunks of
    MAX_GROUPS slots. Few kernels on purpose: decode is bound by launches."""
    num_tokens, top_k = top_k_index.shape
    num_slots = storage.shape[0]
    h, i, num_experts = layout.hidden_size, layout.intermediate_size, layout.num_experts
    if moe_gemv.supports(x, act_fn):
        return moe_gemv.routes_mlp(x, top_k_index, slot_of, num_experts, storage, i)  # [T, A, H]
    if slot_of.numel() == num_experts:
        slot_of = nn.functional.pad(slot_of, (0, 1))  # [E + 1]
    sorted_slots, order = torch.sort(slot_of[top_k_index].flatten(), stable=True)  # [R] each
    xs = x.expand(top_k, h).contiguous() if num_tokens == 1 else x[order // top_k]  # [R, H], routes in slot order
    if num_slots <= MAX_GROUPS:
        y = _grouped_rows(xs, sorted_slots, storage, layout, act_fn)  # [R, H]
    else:  # a wide span of a large cache (eager paths only): one grouped GEMM per MAX_GROUPS slots
        starts = list(range(0, num_slots, MAX_GROUPS))
        cuts = torch.searchsorted(sorted_slots, torch.tensor(starts[1:], device=x.device)).tolist()  # host sync
        bounds = [0, *cuts, sorted_slots.numel()]
        y = torch.cat([_grouped_rows(xs[a:b], sorted_slots[a:b] - lo, storage[lo:lo + MAX_GROUPS], layout, act_fn)
                       for lo, a, b in zip(starts, bounds, bounds[1:]) if b > a])  # [R, H]
    ys = torch.empty_like(y)
    ys[order] = y  # back to route order (t * A + a)
    return ys.view(num_tokens, top_k, h) * (top_k_index < num_experts)[..., None]  # [T, A, H]


def _grouped_rows(xs: torch.Tensor, sorted_slots: torch.Tensor, storage: torch.Tensor, layout: ExpertLayout,
                  act_fn: nn.Module) -> torch.Tensor:
    """[R, H]: rows xs [R, H] sorted by their slot (sorted_slots [R], in [0, S)) through their slot's
    expert, as two grouped matmuls whose group g is slot g of storage [S, N] (S <= MAX_GROUPS)."""
    num_slots, numel = storage.shape
    h, i = layout.hidden_size, layout.intermediate_size
    mm = _grouped_mm_fn()
    groups = moe_gemv.index_tensor("arange", num_slots, storage.device)  # [S]
    offs = torch.searchsorted(sorted_slots, groups, right=True, out_int32=True)  # [S] cumulative route ends
    base = storage.storage_offset()
    gate_up_t = storage.as_strided((num_slots, h, 2 * i), (numel, 1, h), base)  # [S, H, 2I] = gate_up^T per slot
    down_t = storage.as_strided((num_slots, i, h), (numel, 1, i), base + 2 * i * h)  # [S, I, H] = down^T per slot
    gate, up = mm(xs, gate_up_t, offs=offs).chunk(2, dim=-1)  # [R, I] each
    return mm(act_fn(gate) * up, down_t, offs=offs)  # [R, H]


def find_experts(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder-layer index -> the `mlp.experts` module, for every layer with routed experts."""
    found = {}
    for idx, layer in enumerate(model.model.layers):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None and not isinstance(experts, nn.ModuleList):
            found[idx] = experts
    if not found:
        raise ValueError(f"{type(model).__name__} has no `model.layers[i].mlp.experts` modules: not a supported MoE model")
    return found


def layout_of(model: nn.Module, dtype: torch.dtype) -> ExpertLayout:
    experts = find_experts(model)
    first = next(iter(experts.values()))
    cfg = model.config
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if top_k is None:
        raise ValueError(f"config of {cfg.model_type} has no num_experts_per_tok")
    return ExpertLayout(
        moe_layers=tuple(experts),
        num_experts=first.num_experts,
        top_k=int(top_k),
        hidden_size=first.hidden_dim,
        intermediate_size=first.intermediate_dim,
        dtype=dtype,
    )


def install_experts(model: nn.Module, layout: ExpertLayout, provider: ExpertProvider) -> None:
    """Replace every layer's experts module by an `OffloadedExperts` served by `provider`."""
    for idx in layout.moe_layers:
        mlp = model.model.layers[idx].mlp
        mlp.experts = OffloadedExperts(idx, layout, mlp.experts.act_fn, provider)
