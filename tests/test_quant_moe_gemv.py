"""The int8 expert path of the Triton decode kernels (spmoe.runtime.moe_gemv with `scale`) in Triton's CPU
interpreter, float32: every route's output equals the dequantized expert's math for one token (ids mapped in
the kernels) and for several (experts repeated across tokens), "no expert" routes give zero rows, and the
int8 resident experts' `device_routes` dispatch to it where it serves and agree with their torch path."""

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs in Triton's CPU interpreter, which conftest turns on where CUDA is absent")

from spmoe.models.experts import ExpertLayout, expert_mlp  # noqa: E402
from spmoe.models.quantized_draft import Int8ResidentExperts, quantize_rows  # noqa: E402
from spmoe.runtime import moe_gemv  # noqa: E402

H, I, E = 80, 48, 6  # H, I not multiples of the kernels' blocks: masked tails


def _int8_experts(num_slots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [S, N] int8, scale [S, 2I + H]) of random experts, quantized per output row."""
    gen = torch.Generator().manual_seed(seed)
    qs, scales = [], []
    for _ in range(num_slots):
        gate_up, down = torch.randn(2 * I, H, generator=gen) * 0.1, torch.randn(H, I, generator=gen) * 0.1
        (gu_q, gu_s), (d_q, d_s) = quantize_rows(gate_up), quantize_rows(down)
        qs.append(torch.cat([gu_q.flatten(), d_q.flatten()]))
        scales.append(torch.cat([gu_s, d_s]))
    return torch.stack(qs), torch.stack(scales)


def _reference(x: torch.Tensor, index: torch.Tensor, slot_of: torch.Tensor, q: torch.Tensor,
               scale: torch.Tensor) -> torch.Tensor:
    """[T, A, H] in float64: each route through its dequantized expert (id E: a zero row)."""
    layout = ExpertLayout((0,), E, index.shape[1], H, I, torch.float64)
    out = torch.zeros(*index.shape, H, dtype=torch.float64)
    for (t, a), e in zip(torch.cartesian_prod(torch.arange(index.shape[0]), torch.arange(index.shape[1])).tolist(),
                         index.flatten().tolist()):
        if e < E:
            s = int(slot_of[e])
            gate_up, down = layout.split(q[s].double())
            w_gate_up, w_down = gate_up * scale[s, :2 * I, None].double(), down * scale[s, 2 * I:, None].double()
            out[t, a] = expert_mlp(x[t:t + 1].double(), w_gate_up, w_down, nn.SiLU())[0]
    return out


@pytest.mark.parametrize("num_tokens,top_k", [(1, 3), (1, 6), (2, 3), (5, 2), (16, 3)])
def test_int8_routes_match_the_dequantized_experts(num_tokens, top_k):
    q, scale = _int8_experts(E + 1, num_tokens)
    gen = torch.Generator().manual_seed(100 + num_tokens)
    slot_of = torch.randperm(E + 1, generator=gen)[:E]  # [E] an expert's stacked row; one row unused
    x = torch.randn(num_tokens, H, generator=gen)  # [T, H]
    shared = int(torch.randint(E, (1,), generator=gen))  # routed by every token (distinct within a token)
    others = [[e for e in torch.randperm(E, generator=gen).tolist() if e != shared] for _ in range(num_tokens)]
    index = torch.tensor([[shared, *rest[:top_k - 1]] for rest in others])  # [T, A]
    index[-1, -1] = E  # "no expert"
    got = moe_gemv.routes_mlp(x, index, slot_of, E, q, I, scale=scale)
    assert got.shape == (num_tokens, top_k, H)
    torch.testing.assert_close(got.double(), _reference(x, index, slot_of, q, scale), rtol=1e-4, atol=1e-5)
    assert torch.equal(got[-1, -1], torch.zeros(H))


def test_a_token_has_the_same_bits_alone_and_among_others():
    """A route's row does not depend on which other routes share the launch (T = 1 maps ids in the kernels,
    T > 1 sorts mapped slots): the invariant of the bf16 slots holds for int8 ones."""
    q, scale = _int8_experts(E, 3)
    gen = torch.Generator().manual_seed(3)
    slot_of = torch.randperm(E, generator=gen)
    x = torch.randn(4, H, generator=gen)
    index = torch.tensor([[2, 5], [5, 0], [E, 2], [1, 5]])  # [T, A]
    layer = moe_gemv.routes_mlp(x, index, slot_of, E, q, I, scale=scale)
    for t in range(4):
        assert torch.equal(moe_gemv.routes_mlp(x[t:t + 1], index[t:t + 1], slot_of, E, q, I, scale=scale)[0], layer[t])


def _resident(seed: int) -> Int8ResidentExperts:
    """Int8 resident experts of a random two-layer target (layers 1 and 3 have experts), on the CPU."""
    layout = ExpertLayout((1, 3), E, 2, H, I, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    flats = {key: torch.randn(layout.expert_numel, generator=gen) * 0.1 for key in layout.keys}
    target = SimpleNamespace(layout=layout, store=SimpleNamespace(flat=flats.__getitem__))
    return Int8ResidentExperts(target, torch.device("cpu"))


@pytest.mark.parametrize("num_tokens", [1, 3, 16])
def test_resident_device_routes_dispatch_to_the_kernels_and_agree_with_the_torch_path(num_tokens, monkeypatch):
    experts = _resident(num_tokens)
    layout, act = experts.layout, nn.SiLU()
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, H, generator=gen)  # [T, H]
    index = torch.stack([torch.randperm(E, generator=gen)[:layout.top_k] for _ in range(num_tokens)])  # [T, A]
    index[-1, 0] = E  # "no expert"
    want = experts.device_routes(3, x, index, act)  # CPU: the torch path (cast, batched matmuls, scaled)
    calls = []
    real = moe_gemv.routes_mlp
    monkeypatch.setattr(moe_gemv, "routes_mlp", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(moe_gemv, "supports_quantized", lambda x, act_fn: moe_gemv.is_silu(act_fn))
    got = experts.device_routes(3, x, index, act)
    assert calls == [1] and got.shape == (num_tokens, layout.top_k, H)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[-1, 0], torch.zeros(H))
    assert experts.device_routes(3, torch.zeros(17, H), torch.zeros(17, 2, dtype=torch.long), act) is None


def test_cpu_inputs_are_left_to_the_torch_path():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert not moe_gemv.supports_quantized(torch.zeros(1, H, dtype=dtype), nn.SiLU())
