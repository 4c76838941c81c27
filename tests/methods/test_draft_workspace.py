"""The quantized draft's sites (and a quantized copy's linear layers) dequantize into one shared workspace:
same outputs as dequantizing into fresh memory, and (on CUDA) captured graphs of many sites whose pool holds
no per-site transients."""

from __future__ import annotations

import pytest
import torch
from tiny_families import tiny_hf_config
from torch import nn
from transformers import PhimoeForCausalLM

from spmoe.models import int4
from spmoe.models.quantized_draft import Int4Linear, Int8Linear, linear_workspace_bytes
from spmoe.plus.draft_precision import QuantLinear, quantize_draft

SHAPES = [(96, 64), (64, 96), (50, 64), (64, 50), (128, 64), (64, 128)]  # (out, in) per site; 50 pads at groups of 16


def _stack(dtype=torch.float32, device="cpu") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(i, o, bias=n % 2 == 0) for n, (o, i) in enumerate(SHAPES)]).to(device, dtype)


def _reference(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The site's output with its weight dequantized into fresh memory."""
    if q.bits == 8:
        w = q.q.to(x.dtype) * q.scale.to(x.dtype)[:, None]
    else:
        w = int4.dequantize(q.q, q.scale, q.offset, q.in_features, x.dtype)
    return nn.functional.linear(x, w, q.bias_q)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_sites_share_one_workspace_and_compute_what_fresh_dequantization_does(precision):
    model = _stack()
    applied = quantize_draft(model, precision, group_size=16)
    sites = [m for m in model if isinstance(m, QuantLinear)]
    assert len(sites) == len(SHAPES)
    storage = {m.workspace.untyped_storage().data_ptr() for m in sites}
    assert len(storage) == 1
    assert sites[0].workspace.numel() == applied.workspace_bytes
    x = torch.randn(3, SHAPES[0][1])
    for site in sites:
        y = site(x)
        torch.testing.assert_close(y, _reference(site, x), rtol=0, atol=0)
        x = y
    applied.restore()
    assert not any(isinstance(m, QuantLinear) for m in model)


def _forward_like_the_draft(model: nn.Sequential, x: torch.Tensor, ids: torch.Tensor,
                            landed: list[torch.cuda.Event]) -> torch.Tensor:
    """The sites in order with what the draft-router hooks capture between them: a write into a static
    id buffer and an external event (kept alive by the caller, as the draft's router keeps its own)."""
    for i, site in enumerate(model):
        x = site(x)
        ids[i].copy_(x[0, :4].float().argmax().view(1))
        landed[i].record()
    return x


def _capture_growth_bytes(model: nn.Sequential, x: torch.Tensor, num_graphs: int = 3) -> tuple[int, list]:
    """Allocated bytes that `num_graphs` captures of the model (one pool, as a drafter's graphs share) keep."""
    ids = torch.zeros(len(model), 1, dtype=torch.long, device=x.device)
    landed = [torch.cuda.Event(external=True) for _ in model]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            _forward_like_the_draft(model, x, ids, landed)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(x.device)
    graphs, pool = [], None
    for _ in range(num_graphs):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), torch.no_grad():
            y = _forward_like_the_draft(model, x, ids, landed)
        pool = graph.pool()
        graphs.append((graph, y, landed))
    return torch.cuda.memory_allocated(x.device) - before, graphs


def _quantize(model: nn.Sequential, kind: str, precision: str) -> None:
    """spmoe_plus's quantized draft (`plus`) or the quantized copy of a target (`self`), in place."""
    if kind == "plus":
        quantize_draft(model, precision, group_size=128)
        return
    bits = 8 if precision == "int8" else 4
    workspace = torch.empty(linear_workspace_bytes(model, torch.bfloat16, bits, 128), dtype=torch.uint8,
                            device=model[0].weight.device)
    for i, linear in enumerate(model):
        model[i] = Int8Linear(linear, workspace) if bits == 8 else Int4Linear(linear, 128, workspace)


@pytest.mark.parametrize("kind", ["plus", "self"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_captured_graphs_of_quantized_sites_keep_no_per_site_transients(gpu, kind, precision):
    """Captured like the draft (hooks' writes and events between sites, three graphs on one pool), the
    quantized stack keeps no more memory than the same stack in bf16, within one site's weight. The first
    capture on the capture stream also allocates cuBLAS's workspace: a throwaway capture takes it first."""
    torch.manual_seed(0)
    def stack():
        return nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(12)]).to(gpu, torch.bfloat16)
    x = torch.randn(1, 2048, device=gpu, dtype=torch.bfloat16)
    _capture_growth_bytes(stack(), x, num_graphs=1)
    dense_bytes, _ = _capture_growth_bytes(stack(), x)
    model = stack()
    _quantize(model, kind, precision)
    quant_bytes, graphs = _capture_growth_bytes(model, x)
    site_bytes = 2048 * 2048 * 2
    assert quant_bytes - dense_bytes < site_bytes, (
        f"captures kept {quant_bytes / 2**20:.1f} MiB against {dense_bytes / 2**20:.1f} MiB in bf16"
        f" (one site's weight is {site_bytes / 2**20:.1f} MiB)")
    with torch.no_grad():
        expected = model(x)
    graph, y, _ = graphs[-1]
    graph.replay()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_linear_subclass_with_its_own_forward_stays_unquantized(precision):
    """PhiMoE's router subclasses nn.Linear and returns (logits, routing weights, experts): quantizing it as a
    plain linear layer broke the draft's forward. Every plain linear layer is quantized; the router is kept."""
    torch.manual_seed(0)
    model = PhimoeForCausalLM(tiny_hf_config("phimoe", 2, 4)).eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    quantize_draft(model, precision, group_size=16)
    routers = [m for m in model.modules() if type(m).__name__ == "PhimoeTopKRouter"]
    assert len(routers) == 2 and not any(isinstance(m, QuantLinear) for m in routers)
    assert not any(type(m) is nn.Linear for m in model.modules())  # every plain one was swapped
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 4, 128)
