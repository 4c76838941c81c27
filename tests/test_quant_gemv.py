"""The Triton int8 / int4 weight-only linear kernels (spmoe.runtime.quant_gemv) in Triton's CPU interpreter,
float32: the same outputs as dequantizing the weight and multiplying, for every row count the kernel serves,
output widths that are not a multiple of its block, int4 widths that were padded, with and without bias; and
the quantized draft's sites dispatch to it where it serves."""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs in Triton's CPU interpreter, which conftest turns on where CUDA is absent")

from spmoe.models import int4  # noqa: E402
from spmoe.models.quantized_draft import Int4Linear, Int8Linear, quantize_rows  # noqa: E402
from spmoe.plus.draft_precision import QuantLinear  # noqa: E402
from spmoe.runtime import quant_gemv  # noqa: E402


def _linear(out_features: int, in_features: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("out_features,in_features", [(40, 64), (96, 300)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matches_dequantize_then_matmul(rows, out_features, in_features, bias):
    linear = _linear(out_features, in_features, bias, rows)
    q, scale = quantize_rows(linear.weight.data)  # [O, I], [O]
    x = torch.randn(1, rows, in_features)
    expected = nn.functional.linear(x, q.float() * scale[:, None], linear.bias)
    y = quant_gemv.int8_linear(x, q, scale, linear.bias)
    assert y.shape == (1, rows, out_features)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("out_features,in_features,group_size",
                         [(40, 64, 16), (96, 300, 128), (33, 50, 16), (40, 512, 128), (33, 256, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_matches_dequantize_then_matmul(rows, out_features, in_features, group_size, bias):
    linear = _linear(out_features, in_features, bias, rows)
    packed, scale, offset = int4.quantize(linear.weight.data, group_size)
    x = torch.randn(rows, in_features)
    w = int4.dequantize(packed, scale, offset, in_features, torch.float32)  # [O, I]
    expected = nn.functional.linear(x, w, linear.bias)
    y = quant_gemv.int4_linear(x, packed, scale, offset, in_features, linear.bias)
    assert y.shape == (rows, out_features)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_rows_beyond_one_tile_and_cpu_tensors_are_refused_by_supports():
    assert not quant_gemv.supports(torch.zeros(quant_gemv.MAX_TOKENS + 1, 8))
    assert not quant_gemv.supports(torch.zeros(1, 8))  # CPU tensors: the caller dequantizes
    assert not quant_gemv.serves("cpu", "auto") and not quant_gemv.serves("cuda", "torch")


@pytest.mark.parametrize("site", ["plus_int8", "plus_int4", "self_int8", "self_int4"])
def test_quantized_sites_dispatch_to_the_kernel_where_it_serves(site, monkeypatch):
    """With `supports` true (as on CUDA at decode shapes) a site's output is the kernel's; the same site's
    dequantize-then-matmul path agrees with it."""
    linear = _linear(48, 64, True, 0)
    workspace = torch.empty(48 * 64 * 4 * 2, dtype=torch.uint8)
    kind, precision = site.split("_")
    if kind == "plus":
        module = QuantLinear(linear, 8 if precision == "int8" else 4, 16, workspace)
    else:
        module = Int8Linear(linear, workspace) if precision == "int8" else Int4Linear(linear, 16, workspace)
    x = torch.randn(1, 2, 64)
    dequantized = module(x)
    calls = []
    for name in ("int8_linear", "int4_linear"):
        real = getattr(quant_gemv, name)
        monkeypatch.setattr(quant_gemv, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    monkeypatch.setattr(quant_gemv, "supports", lambda t: True)
    y = module(x)
    assert calls == [1]
    torch.testing.assert_close(y, dequantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("block_n,block_k", [(16, 64), (64, 256)])
def test_launch_configs_give_the_same_outputs(rows, block_n, block_k):
    """A sweep's configs change tiling only: int8 and int4 (group 32: a one-row K step spans several groups, the
    4-row tiles take the unaligned path) agree with the defaults."""
    linear = _linear(72, 200, True, rows)
    config = quant_gemv.LaunchConfig(block_n, block_k, num_warps=4, num_stages=2)
    x = torch.randn(rows, 200)
    q, scale = quantize_rows(linear.weight.data)
    torch.testing.assert_close(quant_gemv.int8_linear(x, q, scale, linear.bias, config),
                               quant_gemv.int8_linear(x, q, scale, linear.bias), rtol=1e-5, atol=1e-5)
    packed, s4, o4 = int4.quantize(linear.weight.data, 32)
    torch.testing.assert_close(quant_gemv.int4_linear(x, packed, s4, o4, 200, linear.bias, config),
                               quant_gemv.int4_linear(x, packed, s4, o4, 200, linear.bias), rtol=1e-5, atol=1e-5)
