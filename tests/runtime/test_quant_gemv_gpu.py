"""CUDA only: the quantized linear kernels (`spmoe.runtime.quant_gemv`) in bf16 agree with dequantize-then-matmul
within bf16 rounding, at a draft's shapes (output widths that are not a multiple of the block, an int4 width that
was padded, rows 1..16, bias), and a CUDA graph of several sites replays them with new inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spmoe.models import int4
from spmoe.models.quantized_draft import quantize_rows
from spmoe.plus.draft_precision import quantize_draft
from spmoe.runtime import quant_gemv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or quant_gemv.triton is None, reason="CUDA and Triton")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("out_features,in_features", [(1024, 4096), (4096, 14336), (1000, 4100)])
def test_bf16_kernels_match_dequantize_then_matmul(rows, out_features, in_features):
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(rows)
    w = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(dev, torch.bfloat16)
    bias = (torch.randn(out_features, generator=gen) * 0.02).to(dev, torch.bfloat16)
    x = torch.randn(rows, in_features, generator=gen).to(dev, torch.bfloat16)
    q, scale = quantize_rows(w)
    want = nn.functional.linear(x, q.to(torch.bfloat16) * scale[:, None], bias)
    assert _rel_err(quant_gemv.int8_linear(x, q, scale, bias), want) < 1e-2
    packed, s4, o4 = int4.quantize(w, 128)
    want4 = nn.functional.linear(x, int4.dequantize(packed, s4, o4, in_features, torch.bfloat16), bias)
    assert _rel_err(quant_gemv.int4_linear(x, packed, s4, o4, in_features, bias), want4) < 1e-2


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_graph_of_quantized_sites_replays_new_inputs(precision):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sites = nn.Sequential(*[nn.Linear(2048, 2048, bias=i % 2 == 0) for i in range(4)]).to(dev, torch.bfloat16)
    quantize_draft(sites, precision, group_size=128)
    x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            sites(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = sites(x)
        for _ in range(3):
            x.copy_(torch.randn(1, 2048, device=dev, dtype=torch.bfloat16))
            graph.replay()
            assert torch.equal(y, sites(x))
