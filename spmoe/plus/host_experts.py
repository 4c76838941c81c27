"""
CPU-assisted experts: when experts miss at a layer, compute some of them on the host, from the
expert store, while the others stream into the GPU cache.

Data flow for one MoE layer forward (T tokens, H hidden): the routed ids reach the host (the same
sync `OffloadedExperts` makes); `HostPlanner.split` picks the host set among the experts that are
not resident; their token rows of the hidden states go down ([T, H], kilobytes) and one host
worker thread computes them with torch's CPU kernels on the store's weights, while the main
thread runs the GPU experts through the provider (hits, landed prefetches, on-demand loads; in one
grouped matmul when the provider's `serve_layer` pins them all at once, the host experts' routes
then computed on a spare slot and overwritten); then the host outputs go up and land in their
(token, slot) rows. Host experts are not loaded for the layer, so they are not in the provider's
expert events (hits/misses count GPU-served experts only); `HostStats` counts them. With `fill`
(`method.plus.host_fill`), after the layer's demand copies are issued, the host experts that have a
free slot are also loaded there (never evicting, never pinned), so they hit later; without it they
move no bytes, and a cache with room stays as cold as the host's share.

Cost model (per missing expert e with n_e routed tokens, greedy, most tokens first): GPU finish =
copies already queued x copy_ms + (GPU experts so far + 1) x copy_ms x f(layer); host finish = the k-th host
expert's finish on the one host worker = start_ms + the sum of expert_ms(n) over the host experts so
far, e included; e goes to the host when it finishes there before GPU finish - credit (ties stay on the
link). The credit (`reuse`, `method.plus.host_reuse`) prices what a load buys beyond this layer call: a
host-computed expert stays cold, so its next access misses again, while a loaded one hits with the probability
that a routed expert is found resident; credit = r x copy_ms, r an EWMA (weight `ema`) over layer calls of the
fraction of a call's routed experts already resident (before any is loaded or computed). With r near 1 (a
cache that holds most of the working set) host compute wins only behind a queue of copies; without the credit
such a cache turns every host expert into a recurring miss. `HostTimes` holds the
in-run host cost: expert_ms(n) is an EWMA of the measured time of one host expert with n routed
tokens, per n (a count not yet observed scales the profiled line a + b n, fitted on the host's
time per expert at 1 and 4 tokens, by the in-run/profiled ratio of the nearest observed count);
start_ms is an EWMA of the delay from submitting a layer's host experts to the worker starting
them. copy_ms is measured on the run's own link (paced when pacing is on); f(layer) is the fraction
of an expert's bytes a demand copy moves there (1, or a low-precision copy's fraction past the
cutoff with lossy misses); the queue is the provider's prefetch copies still in flight.
Numerics: on a CPU device both paths run the same float32 kernels on the same inputs, so outputs
are bit-identical; on CUDA the host computes in the store's dtype (bf16) with the host's
accumulation order, which differs from the GPU's within bf16 rounding.
A layer call with no host expert is served as `OffloadedExperts` serves it, from the routes already on the host
(its grouped kernels, as a call-site CUDA graph under piecewise decode); one with host experts runs eagerly.
Invariant: as in `OffloadedExperts`, every expert writes its own rows of a [T, A, H] buffer and the
weighted sum over A runs in a fixed order afterwards, so the split does not change the sum order.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from spmoe.models.experts import OffloadedExperts, combine_routes, expert_mlp, routed_ids, routed_tokens
from spmoe.offload.prefetch import PrefetchProvider
from spmoe.offload.store import ExpertStore

log = logging.getLogger(__name__)


@dataclass
class HostStats:
    num_host_experts: int = 0  # expert computations done on the host
    num_gpu_experts: int = 0
    host_ms: float = 0.0  # host worker time computing
    wait_ms: float = 0.0  # main-thread time waiting for host outputs after its GPU experts
    num_filled: int = 0  # host experts also loaded into free slots (`fill`)


@dataclass
class HostCost:
    """host_ms(n) = fixed_ms + per_token_ms * n per expert; copy_ms per expert over the link."""

    fixed_ms: float
    per_token_ms: float
    copy_ms: float

    def host_ms(self, num_tokens: int) -> float:
        return self.fixed_ms + self.per_token_ms * num_tokens


def measure_host_cost(store: ExpertStore, act_fn: torch.nn.Module, copy_ms: float, reps: int = 5) -> HostCost:
    """Median host time of one expert at 1 and 4 tokens (the store's dtype and layout)."""
    layout = store.layout
    gate_up, down = layout.split(store.flat(layout.keys[0]))
    gen = torch.Generator().manual_seed(0)

    def median_ms(n: int) -> float:
        x = torch.randn(n, layout.hidden_size, generator=gen).to(layout.dtype)  # [n, H]
        expert_mlp(x, gate_up, down, act_fn)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            expert_mlp(x, gate_up, down, act_fn)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    one, four = median_ms(1), median_ms(4)
    per_token = max(0.0, (four - one) / 3)
    return HostCost(max(0.0, one - per_token), per_token, copy_ms)


class HostTimes:
    """The in-run host cost (module docstring). `ema` weighs each new observation; the first
    observation at a count (and of the start delay) is taken as it is."""

    def __init__(self, profiled: HostCost, ema: float = 0.2):
        self.profiled, self.ema = profiled, ema
        self.ms_at: dict[int, float] = {}  # routed tokens -> EWMA of ms per host expert
        self.start_ms: float | None = None

    def expert_ms(self, num_tokens: int) -> float:
        if num_tokens in self.ms_at:
            return self.ms_at[num_tokens]
        modelled = self.profiled.host_ms(num_tokens)
        seen = list(self.ms_at.items())
        if not seen:
            return modelled
        n, ms = min(seen, key=lambda item: (abs(item[0] - num_tokens), item[0]))
        base = self.profiled.host_ms(n)
        return ms if base <= 0 else modelled * ms / base

    def observe_expert(self, num_tokens: int, ms: float) -> None:
        old = self.ms_at.get(num_tokens)
        self.ms_at[num_tokens] = ms if old is None else (1 - self.ema) * old + self.ema * ms

    def observe_start(self, ms: float) -> None:
        self.start_ms = ms if self.start_ms is None else (1 - self.ema) * self.start_ms + self.ema * ms


class HostPlanner:
    """Which missing experts of a layer forward go to the host (`mode` off | auto | all).
    `copy_fraction(layer)`: the fraction of an expert's bytes a demand copy moves at that layer."""

    def __init__(self, provider: PrefetchProvider, mode: str, cost: HostCost | None, max_per_layer: int | None,
                 ema: float = 0.2, copy_fraction=None, reuse: bool = False):
        if mode == "auto" and cost is None:
            raise ValueError("host_compute=auto needs a measured HostCost")
        self.provider, self.mode, self.cost, self.max_per_layer = provider, mode, cost, max_per_layer
        self.times = HostTimes(cost, ema) if cost is not None else None
        self.copy_fraction = copy_fraction or (lambda layer: 1.0)
        self.reuse, self.ema = reuse, ema
        self.resident_rate: float | None = None  # r: EWMA of the resident fraction of a call's routed experts
        self.allowed = True  # False: every expert on the link this step (`spmoe.plus.host_gate.HostGate`)

    def observe(self, start_ms: float, expert_ms: list[tuple[int, float]]) -> None:
        """The host worker started `start_ms` after the submit and took these (routed tokens, ms) per
        expert (called from the host worker)."""
        if self.times is None:
            return
        self.times.observe_start(start_ms)
        for n, ms in expert_ms:
            self.times.observe_expert(n, ms)

    def split(self, layer: int, tokens_of: dict[int, int]) -> list[int]:
        """Host set among `tokens_of` (expert -> routed tokens), most tokens first."""
        if self.mode == "off" or not self.allowed:
            return []
        cache = self.provider.cache
        with self.provider.lock:
            missing = [e for e in tokens_of if cache.slot_of((layer, e)) is None]
        reuse = self.mode == "auto" and self.reuse and bool(tokens_of)
        if reuse:  # every call counts toward r, the all-resident ones too
            rate = 1 - len(missing) / len(tokens_of)
            old = self.resident_rate
            self.resident_rate = rate if old is None else (1 - self.ema) * old + self.ema * rate
        if not missing:  # nothing to price (nor the copy queue to scan)
            return []
        missing.sort(key=lambda e: -tokens_of[e])
        cap = len(missing) if self.max_per_layer is None else self.max_per_layer
        if self.mode == "all":
            return missing[:cap]
        copy_ms = self.cost.copy_ms * self.copy_fraction(layer)
        credit = self.resident_rate * copy_ms if reuse else 0.0
        host, host_t = [], self.times.start_ms or 0.0
        gpu_t = self.provider.num_in_flight() * self.cost.copy_ms  # prefetch copies move whole experts
        for e in missing:
            g, h = gpu_t + copy_ms, host_t + self.times.expert_ms(tokens_of[e])
            if h < g - credit and len(host) < cap:
                host.append(e)
                host_t = h
            else:
                gpu_t = g
        return host


class HostAssistedExperts(OffloadedExperts):
    """`OffloadedExperts` whose missing experts may be computed on the host (see the module docstring)."""

    def __init__(self, base: OffloadedExperts, planner: HostPlanner, store: ExpertStore, pool: ThreadPoolExecutor,
                 stats: HostStats, on_layer=None, fill: bool = False):
        super().__init__(base.layer_idx, base.layout, base.act_fn, base.provider)
        self.planner, self.store, self.pool, self.stats = planner, store, pool, stats
        self.on_layer = on_layer  # (layer, num_tokens, num_unique, num_missing) -> None, e.g. the k chooser
        self.fill = fill  # also load the host experts into free slots, after the layer's demand copies

    def _host(self, x: torch.Tensor, jobs: list[tuple[int, torch.Tensor]], submitted: float,
              ) -> list[tuple[int, torch.Tensor]]:
        t0 = time.perf_counter()
        out, times = host_expert_outputs(x, jobs, self.store, self.layer_idx, self.act_fn)
        self.stats.host_ms += (time.perf_counter() - t0) * 1e3
        self.planner.observe((t0 - submitted) * 1e3, times)
        return out

    def compute(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                site=None) -> torch.Tensor:
        # T = tokens, A = experts per token, H = hidden, R = T * A routes
        if self.holds_all():  # nothing can miss: nothing for the host
            return super().compute(hidden_states, top_k_index, top_k_weights, site)
        num_tokens, top_k = top_k_index.shape
        index_cpu = top_k_index.cpu()  # [T, A]; the layer's one device->host sync
        if not self.planner.allowed and self.on_layer is None:  # host gated off: no split, the base path's work
            ids = routed_ids(index_cpu, self.layout.num_experts)
            return self._on_device(hidden_states, top_k_index, top_k_weights, site, index_cpu, ids)
        tokens_of = routed_tokens(index_cpu, self.layout.num_experts)
        host_ids = self.planner.split(self.layer_idx, tokens_of)
        if self.on_layer is not None:
            cache = self.provider.cache
            missing = sum(1 for e in tokens_of if cache.slot_of((self.layer_idx, e)) is None)
            self.on_layer(self.layer_idx, num_tokens, len(tokens_of), missing)
        if not host_ids:
            return self._on_device(hidden_states, top_k_index, top_k_weights, site, index_cpu, list(tokens_of))
        order, span = route_spans(index_cpu, self.layout.num_experts)  # torch ops: only for calls with host experts
        rows_cpu = order // top_k  # [R]: each route's token
        x_host = hidden_states.to("cpu")  # [T, H]
        future = self.pool.submit(self._host, x_host, [(e, rows_cpu[span[e][0]:span[e][1]]) for e in host_ids],
                                  time.perf_counter())
        on_host = set(host_ids)
        gpu_ids = [e for e in span if e not in on_host]
        served = self._provide(hidden_states, gpu_ids, index_cpu)  # the GPU experts in one grouped matmul if it can
        # over the span: the host experts' routes read its spare slot (the provider did not serve them,
        # see spmoe.offload.layer_slots); their rows are overwritten by the host outputs below
        ys = self._routes(hidden_states, top_k_index, index_cpu, served, whole=False)  # [T, A, H]
        self.provider.events.mark_host(self.layer_idx, host_ids)  # after `_routes`: the layer's record exists
        self.stats.num_gpu_experts += len(gpu_ids)
        if self.fill:
            self.stats.num_filled += self.provider.fill(self.layer_idx, host_ids)
        t0 = time.perf_counter()
        results = future.result()
        self.stats.wait_ms += (time.perf_counter() - t0) * 1e3
        place_host_rows(ys, order, span, top_k, results)
        self.stats.num_host_experts += len(host_ids)
        return combine_routes(ys, top_k_weights, self.act_fn)  # [T, H], as OffloadedExperts sums them

    def _on_device(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, site,
                   index_cpu: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """[T, H] with every routed expert (`ids`, sorted) on the device: the base path (a call-site graph under
        piecewise decode)."""
        self.stats.num_gpu_experts += len(ids)
        served = self._provide(hidden_states, ids, index_cpu)
        if site is not None and self.graph_experts and self._kernels(hidden_states):
            return self._graphed_served(hidden_states, top_k_index, top_k_weights, site, index_cpu, served)
        return combine_routes(self._routes(hidden_states, top_k_index, index_cpu, served), top_k_weights, self.act_fn)


def host_pool(num_threads: int | None) -> ThreadPoolExecutor:
    """One host worker thread whose torch CPU ops use `num_threads` threads (default: all cores but two)."""
    n = num_threads or max(1, (os.cpu_count() or 1) - 2)
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="spmoe-host",
                              initializer=lambda: torch.set_num_threads(n))


def install_host_experts(model: torch.nn.Module, moe_layers, planner: HostPlanner, store: ExpertStore,
                         pool: ThreadPoolExecutor, stats: HostStats, on_layer=None, fill: bool = False) -> None:
    """Replace each layer's `OffloadedExperts` by a `HostAssistedExperts` over the same provider."""
    for idx in moe_layers:
        mlp = model.model.layers[idx].mlp
        mlp.experts = HostAssistedExperts(mlp.experts, planner, store, pool, stats, on_layer, fill)


def route_spans(index_cpu: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, dict[int, tuple[int, int]]]:
    """Routes [T, A] on the host grouped by expert: (order [R], the routes sorted by expert, stable; expert ->
    its [start, end) in `order`), routed experts only (ids outside [0, E) are "no expert")."""
    sorted_ids, order = torch.sort(index_cpu.flatten(), stable=True)  # [R]
    ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return order, {e: (end - n, end) for e, n, end in zip(ids.tolist(), counts.tolist(), ends) if 0 <= e < num_experts}


def host_expert_outputs(x: torch.Tensor, jobs: list[tuple[int, torch.Tensor]], store: ExpertStore, layer: int,
                        act_fn: torch.nn.Module) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, float]]]:
    """On the host, for each (expert, token rows) job of `layer`: (expert, output [n_e, H]) from the store's
    weights and x [T, H] (host), and (n_e, ms) per expert."""
    out, times = [], []
    for e, rows in jobs:
        t = time.perf_counter()
        gate_up, down = store.layout.split(store.flat((layer, e)))
        out.append((e, expert_mlp(x[rows], gate_up, down, act_fn)))  # [n_e, H]
        times.append((len(rows), (time.perf_counter() - t) * 1e3))
    return out, times


def place_host_rows(ys: torch.Tensor, order: torch.Tensor, span: dict[int, tuple[int, int]], top_k: int,
                    results: list[tuple[int, torch.Tensor]]) -> None:
    """Write each host expert's output rows into ys [T, A, H] at its routes (`route_spans`' order and span).
    On CUDA the routes and outputs go up in one page-locked, non-blocking copy each: a pageable copy would make
    the host wait for the compute stream (the layer's grouped matmul, so its demand copies) to drain."""
    if not results:
        return
    routes = torch.cat([order[span[e][0]:span[e][1]] for e, _ in results])  # [R_h]: the host experts' routes
    outputs = torch.cat([y for _, y in results])  # [R_h, H]
    if ys.is_cuda:
        routes = routes.pin_memory().to(ys.device, non_blocking=True)
        outputs = outputs.pin_memory().to(ys.device, non_blocking=True)
    ys[routes // top_k, routes % top_k] = outputs.to(ys.dtype)
