"""Group-wise int4 packing (spmoe.models.int4): exact pack/unpack, half-a-step error, layout and bytes."""

from __future__ import annotations

import pytest
import torch

from spmoe.models import int4


def test_pack_unpack_round_trip_is_exact():
    q = torch.randint(0, 16, (7, 2 * 33), dtype=torch.uint8)
    packed = int4.pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 33)
    assert torch.equal(int4.unpack(packed), q)
    assert torch.equal(packed[0, 0], q[0, 0] | (q[0, 1] << 4))  # low nibble first
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(int4.pack(int4.unpack(every_byte)), every_byte)


@pytest.mark.parametrize("in_features, group_size", [(64, 128), (256, 128), (70, 16), (33, 8), (10944, 128)])
def test_quantization_error_is_half_a_step_per_group(in_features, group_size):
    torch.manual_seed(0)
    w = torch.randn(12, in_features) * torch.rand(12, 1)  # rows of different ranges
    packed, scale, offset = int4.quantize(w, group_size)
    num_groups, g = int4.group_shape(in_features, group_size)
    assert g % 2 == 0 and g <= group_size or num_groups == 1
    assert num_groups * g >= in_features > (num_groups - 1) * g
    assert packed.shape == (12, num_groups * g // 2) and scale.shape == offset.shape == (12, num_groups)
    w_hat = int4.dequantize(packed, scale, offset, in_features, torch.float32)  # [O, I]
    assert w_hat.shape == w.shape
    step = scale.repeat_interleave(g, dim=1)[:, :in_features]  # each column's group scale
    assert torch.all((w_hat - w).abs() <= step / 2 + 1e-6)
    out = torch.empty_like(w)
    assert int4.dequantize(packed, scale, offset, in_features, torch.float32, out=out) is out
    assert torch.equal(out, w_hat)


def test_bfloat16_scales_and_bytes():
    torch.manual_seed(0)
    w = (torch.randn(32, 256) * 0.02).to(torch.bfloat16)
    packed, scale, offset = int4.quantize(w, 128)
    assert scale.dtype == offset.dtype == torch.bfloat16
    w_hat = int4.dequantize(packed, scale, offset, 256, torch.bfloat16)
    step = scale.float().repeat_interleave(128, dim=1)
    # half a step, plus bfloat16's rounding (8 significant bits) of q * scale and of the sum with the offset
    slack = 2**-8 * (w.float().abs() + 16 * step)
    assert torch.all((w_hat.float() - w.float()).abs() <= step / 2 + slack)
    nbytes = sum(t.numel() * t.element_size() for t in (packed, scale, offset))
    assert nbytes == int4.int4_bytes(32, 256, 128, 2) == 32 * (128 + 2 * 2 * 2)


def test_constant_group_is_exact():
    w = torch.full((2, 8), 0.25)
    w_hat = int4.dequantize(*int4.quantize(w, 8), 8, torch.float32)
    assert torch.equal(w_hat, w)


@pytest.mark.parametrize("shape", [(7, 37), (16, 130), (8, 64)])  # padded, padded, unpadded widths
def test_dequantize_into_a_workspace_equals_fresh_dequantization(shape):
    o, i = shape
    w = torch.randn(o, i)
    q, scale, offset = int4.quantize(w, 16)
    workspace = torch.empty(int4.workspace_bytes(o, i, 16, 4), dtype=torch.uint8)
    into = int4.dequantize_into(q, scale, offset, i, workspace, torch.float32)
    assert into.shape == (o, i) and into.untyped_storage().data_ptr() == workspace.untyped_storage().data_ptr()
    torch.testing.assert_close(into, int4.dequantize(q, scale, offset, i, torch.float32), rtol=0, atol=0)
