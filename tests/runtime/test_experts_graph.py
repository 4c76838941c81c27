"""CUDA only: a piecewise call site's expert graph (`spmoe.runtime.piecewise.ExpertsGraph`) over the
device slot-map rows (`spmoe.offload.layer_slots.SlotTables`, only the routed entries written) gives the
eager kernels' bits over the full map, and a graph captured once follows each step's new slot map and
new inputs (static addresses)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spmoe.models.experts import ExpertLayout, combine_routes, grouped_expert_mlp
from spmoe.offload.layer_slots import SlotTables
from spmoe.runtime import moe_gemv
from spmoe.runtime.piecewise import ExpertsGraph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or moe_gemv.triton is None, reason="CUDA and Triton")


def test_site_graph_follows_the_slot_map_and_inputs():
    dev = torch.device("cuda")
    layout = ExpertLayout((0,), 8, 2, 256, 128, torch.bfloat16)
    gen = torch.Generator(device="cpu").manual_seed(0)
    storage = (torch.randn(12, layout.expert_numel, generator=gen) * 0.05).to(dev, torch.bfloat16)  # [S, N]
    x = torch.empty(1, 256, dtype=torch.bfloat16, device=dev)  # static inputs of the call site
    index = torch.empty(1, 2, dtype=torch.long, device=dev)
    weights = torch.empty(1, 2, dtype=torch.bfloat16, device=dev)
    tables, act = SlotTables(8, dev), nn.SiLU()
    site = ExpertsGraph(torch.empty(1, 256, dtype=torch.bfloat16, device=dev), torch.cuda.graph_pool_handle())
    for step in range(5):
        slots = torch.randperm(12, generator=gen)[:9].tolist()  # this step's map: expert e -> slots[e]
        routed = torch.randperm(8, generator=gen)[:2]
        slot_of = tables.update(0, [(e, slots[e]) for e in routed.tolist()])  # [E + 1]: routed entries only
        x.copy_(torch.randn(1, 256, generator=gen))
        index.copy_(routed.view(1, 2))
        weights.copy_(torch.rand(1, 2, generator=gen))
        got = site.run(lambda: combine_routes(grouped_expert_mlp(x, index, storage, slot_of, layout, act), weights, act))
        eager_map = torch.tensor(slots, device=dev)
        want = combine_routes(grouped_expert_mlp(x, index, storage, eager_map, layout, act), weights, act)
        assert torch.equal(got, want), step
    assert site.num_replays == 4  # eager once, captured at the second run, replayed from then on
