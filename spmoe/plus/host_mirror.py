"""
Host mirror: the lossless check's reference computes on the host exactly the experts a run computed
on the host, with the run's host arithmetic, so a run with CPU-assisted experts is checked under the
same tie-aware rule as every other method instead of a wider tolerance.

Terms: a run's *host plan* is, per engine step and MoE layer, the experts `HostAssistedExperts`
computed on the host (`LayerEvents.host` in the step's records). The reference (GPU-resident, same
weights, teacher-forced over the run's own steps: `spmoe.trace.lossless`) serves every route from
its device slots as always; at forced step i, layer l, the routes of the experts in the run's plan
are recomputed on a host worker by `host_expert_outputs` (the run's function: the store's weights,
the same token rows, one worker thread with the run's thread count) and overwrite those rows
before the routes' weighted sum, as in the run.

Invariants: the reference's device-served rows are its own (the expert kernels give each route's
row independently of which other routes share the call: every other method's GPU check relies on
it); an expert of the plan that the reference does not route at that layer (its prefix already
differs) is skipped and counted in `num_unrouted`; outside a check the reference's experts modules
are its own (`close` puts them back). On a CPU device host and device arithmetic are one float32
path, so the mirror changes nothing there.
"""

from __future__ import annotations

import torch

from spmoe.models.experts import OffloadedExperts, combine_routes
from spmoe.offload.store import ExpertStore
from spmoe.plus.host_experts import host_expert_outputs, host_pool, place_host_rows, route_spans


def host_plan(records) -> list[dict[int, list[int]]]:
    """Per step of a generation's records: MoE layer -> experts computed on the host (layers with none left out)."""
    return [{ev.layer: list(ev.host) for ev in r.layers if ev.host} for r in records]


def has_host_experts(gens) -> bool:
    return any(ev.host for g in gens for r in g.records for ev in r.layers)


class HostMirror:
    """A step listener of the reference runtime whose experts modules it wraps (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, moe_layers, store: ExpertStore, num_threads: int | None):
        self.store, self.model, self.moe_layers = store, model, list(moe_layers)
        self.pool = host_pool(num_threads)
        self.plan: list[dict[int, list[int]]] = []
        self.step = 0
        self.num_mirrored = 0  # host experts recomputed on the host
        self.num_unrouted = 0  # plan entries the reference did not route
        self._originals = {}
        for idx in self.moe_layers:
            mlp = model.model.layers[idx].mlp
            self._originals[idx] = mlp.experts
            mlp.experts = HostMirroredExperts(mlp.experts, self)

    def follow(self, records) -> None:
        """Mirror this generation's host plan in the forced steps that follow (step i = records[i])."""
        self.plan = host_plan(records)

    def host_ids(self, layer: int) -> list[int]:
        return self.plan[self.step].get(layer, []) if self.step < len(self.plan) else []

    def begin_step(self, step: int) -> None:
        self.step = step

    def end_step(self) -> None:
        pass

    def close(self) -> None:
        for idx, experts in self._originals.items():
            self.model.model.layers[idx].mlp.experts = experts
        self._originals.clear()
        self.pool.shutdown()


class HostMirroredExperts(OffloadedExperts):
    """A reference experts module whose routes of the run's host experts are recomputed on the host."""

    def __init__(self, base: OffloadedExperts, mirror: HostMirror):
        super().__init__(base.layer_idx, base.layout, base.act_fn, base.provider)
        self.base, self.mirror = base, mirror
        self.seam_hooks = base.seam_hooks

    def compute(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                site=None) -> torch.Tensor:
        # T = tokens, A = experts per token, H = hidden, R = T * A routes
        planned = self.mirror.host_ids(self.layer_idx)
        if not planned:
            return self.base.compute(hidden_states, top_k_index, top_k_weights)
        top_k = top_k_index.shape[1]
        ys = self.base.route_outputs(hidden_states, top_k_index)  # [T, A, H], the reference's own rows
        order, span = route_spans(top_k_index.cpu(), self.layout.num_experts)
        host_ids = [e for e in planned if e in span]
        self.mirror.num_unrouted += len(planned) - len(host_ids)
        rows_cpu = order // top_k  # [R]: each route's token
        jobs = [(e, rows_cpu[span[e][0]:span[e][1]]) for e in host_ids]
        x_host = hidden_states.to("cpu")  # [T, H]
        results, _ = self.mirror.pool.submit(host_expert_outputs, x_host, jobs, self.mirror.store, self.layer_idx,
                                             self.act_fn).result()
        place_host_rows(ys, order, span, top_k, results)
        self.mirror.num_mirrored += len(host_ids)
        return combine_routes(ys, top_k_weights, self.act_fn)  # [T, H]
