"""On CUDA in bf16 (the kernels compiled, not interpreted): the int8 resident experts' kernel path
(`spmoe.runtime.moe_gemv` with row scales) gives the torch path's route outputs within bf16 rounding, at
DeepSeek-V2-Lite's expert shape (H 2048, I 1408, 6 of 64 experts) for one token and for two."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from spmoe.models.experts import ExpertLayout
from spmoe.models.quantized_draft import Int8ResidentExperts
from spmoe.runtime import moe_gemv

H, I, E, A = 2048, 1408, 64, 6


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_int8_kernel_routes_agree_with_the_torch_path_in_bf16(gpu, num_tokens, monkeypatch):
    pytest.importorskip("triton")
    layout = ExpertLayout((1,), E, A, H, I, torch.bfloat16)
    gen = torch.Generator().manual_seed(num_tokens)
    flats = {key: (torch.randn(layout.expert_numel, generator=gen) * 0.02).to(torch.bfloat16) for key in layout.keys}
    experts = Int8ResidentExperts(SimpleNamespace(layout=layout, store=SimpleNamespace(flat=flats.__getitem__)), gpu)
    x = torch.randn(num_tokens, H, generator=gen).to(gpu, torch.bfloat16)  # [T, H]
    index = torch.stack([torch.randperm(E, generator=gen)[:A] for _ in range(num_tokens)]).to(gpu)  # [T, A]
    act = nn.SiLU()
    assert moe_gemv.supports_quantized(x, act)
    got = experts.device_routes(1, x, index, act)  # [T, A, H], the kernels
    monkeypatch.setattr(moe_gemv, "supports_quantized", lambda x, act_fn: False)
    want = experts.device_routes(1, x, index, act)  # the torch path
    assert got.shape == want.shape == (num_tokens, A, H)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 2e-2, rel
