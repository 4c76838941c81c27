"""The quantized draft's sites dequantize into one shared workspace: same outputs as dequantizing into
fresh memory, nothing allocated per site, and (on CUDA) a captured graph of many sites whose pool
holds no per-site transients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spmoe.models import int4
from spmoe.plus.draft_precision import QuantLinear, quantize_draft

SHAPES = [(96, 64), (64, 96), (128, 64), (64, 128)]  # (out, in) of each site, in order


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


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_captured_graph_of_quantized_sites_keeps_no_per_site_transients(gpu, precision):
    """A capture does not reuse memory freed within it: per-site [O, I] transients would each stay in the
    graph's pool. With the shared workspace the pool holds only the activations."""
    big = [(2048, 2048)] * 12
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(i, o, bias=False) for o, i in big]).to(gpu, torch.bfloat16)
    quantize_draft(model, precision, group_size=128)
    site_bytes = 2048 * 2048 * 2
    x = torch.randn(1, 2048, device=gpu, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(gpu)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y = model(x)
    grown = torch.cuda.memory_allocated(gpu) - before
    assert grown < site_bytes, f"capture kept {grown / 2**20:.1f} MiB (one site's weight is {site_bytes / 2**20:.1f} MiB)"
    expected = model(x)
    graph.replay()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
