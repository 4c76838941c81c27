"""The Triton decode kernels (spmoe.runtime.moe_gemv) in Triton's CPU interpreter, float32.

The interpreter mis-computes bf16 dots, so bf16 numerics are checked on the GPU
(experiments.bench_expert_kernel); here: grouping by slot, route order, "no expert" rows, a
slot's rows independent of the launch, and the dispatch from the experts module."""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs in Triton's CPU interpreter, which conftest turns on where CUDA is absent")

from spmoe.models import experts as experts_mod  # noqa: E402
from spmoe.models.experts import ExpertLayout, expert_mlp  # noqa: E402
from spmoe.runtime import moe_gemv  # noqa: E402

H, I, E = 64, 48, 6


@pytest.fixture
def kernel():
    """The kernels, interpreted on the CPU (tests/conftest.py sets TRITON_INTERPRET before any import)."""
    return moe_gemv


def _reference(x, route_slots, top_k, storage, layout):
    out = torch.zeros(len(route_slots), H)
    for r, s in enumerate(route_slots.tolist()):
        if s >= 0:
            out[r] = expert_mlp(x[r // top_k: r // top_k + 1], *layout.split(storage[s]), nn.SiLU())[0]
    return out


@pytest.mark.parametrize("num_tokens,top_k", [(1, 2), (3, 2), (5, 3), (16, 2)])
def test_routes_match_per_expert_math(kernel, num_tokens, top_k):
    gen = torch.Generator().manual_seed(num_tokens)
    layout = ExpertLayout((0,), E, top_k, H, I, torch.float32)
    storage = torch.randn(E + 2, layout.expert_numel, generator=gen) * 0.1  # [S, N]
    x = torch.randn(num_tokens, H, generator=gen)
    route_slots = torch.stack([torch.randperm(E + 2, generator=gen)[:top_k] for _ in range(num_tokens)]).flatten()
    route_slots[-1] = -1  # a "no expert" route
    got = kernel.slot_mlp(x, route_slots, top_k, storage, I)
    want = _reference(x, route_slots, top_k, storage, layout)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[-1], torch.zeros(H))


def test_one_slot_alone_equals_its_rows_in_a_layer_launch(kernel):
    gen = torch.Generator().manual_seed(7)
    storage = torch.randn(E, 3 * I * H, generator=gen) * 0.1
    x = torch.randn(4, H, generator=gen)
    route_slots = torch.tensor([3, 1, 0, 3, 3, 5, 2, 3])  # slot 3 serves tokens 0, 1, 2, 3
    layer = kernel.slot_mlp(x, route_slots, 2, storage, I)
    alone = kernel.slot_mlp(x, torch.full((4,), 3), 1, storage, I)
    assert torch.equal(alone, layer[[0, 3, 4, 7]])


def test_presorted_routes_skip_the_sort_with_the_same_bits(kernel):
    """One token's routes (distinct experts, a "no expert" among them) and one expert's rows are already
    grouped by slot: `grouped=True` gives the sorted launch's bits."""
    gen = torch.Generator().manual_seed(11)
    storage = torch.randn(E, 3 * I * H, generator=gen) * 0.1
    x = torch.randn(1, H, generator=gen)
    one_token = torch.tensor([4, -1, 0, 2])
    assert torch.equal(kernel.slot_mlp(x, one_token, 4, storage, I, grouped=True),
                       kernel.slot_mlp(x, one_token, 4, storage, I))
    rows = torch.randn(5, H, generator=gen)
    one_expert = torch.full((5,), 3)
    assert torch.equal(kernel.slot_mlp(rows, one_expert, 1, storage, I, grouped=True),
                       kernel.slot_mlp(rows, one_expert, 1, storage, I))


def test_one_token_maps_ids_to_slots_inside_the_kernels(kernel):
    """routed_mlp (ids looked up in the slot table by the kernels) gives slot_mlp's bits on the mapped
    slots; ids outside [0, E) (transformers' sentinel E, with a spare entry in the table) give zero rows."""
    gen = torch.Generator().manual_seed(13)
    storage = torch.randn(E + 1, 3 * I * H, generator=gen) * 0.1
    x = torch.randn(1, H, generator=gen)
    slot_of = torch.tensor([6, 0, 5, 1, 4, 2, 3])  # [E + 1]: entry E a spare slot, never read for routes
    index = torch.tensor([[3, E, 0, 5]])  # [1, A]
    got = kernel.routed_mlp(x, index, slot_of, E, storage, I)
    want = kernel.slot_mlp(x, torch.tensor([1, -1, 6, 2]), 4, storage, I)
    assert torch.equal(got, want) and torch.equal(got[1], torch.zeros(H))


def test_combine_weights_routes_in_float32(kernel):
    gen = torch.Generator().manual_seed(5)
    ys = torch.randn(3, 6, H, generator=gen)  # [T, A, H]
    weights = torch.rand(3, 6, generator=gen)  # [T, A]
    want = (ys.double() * weights.double()[..., None]).sum(dim=1)
    assert torch.allclose(kernel.combine(ys, weights).double(), want, rtol=1e-5, atol=1e-6)


def test_experts_module_dispatches_decode_shapes_to_the_kernel(kernel, monkeypatch):
    """grouped_expert_mlp and slot_expert_mlp through the kernel (admitted on the CPU here) agree with
    torch's grouped GEMM and with each other, "no expert" sentinel routes included."""
    gen = torch.Generator().manual_seed(3)
    layout = ExpertLayout((0,), E, 2, H, I, torch.float32)
    storage = torch.randn(E + 1, layout.expert_numel, generator=gen) * 0.1
    slot_of = torch.tensor([6, 0, 5, 1, 4, 2])
    x = torch.randn(3, H, generator=gen)
    index = torch.tensor([[0, 3], [3, E], [5, 0]])  # [T, A]; E: no expert
    act = nn.SiLU()
    want = experts_mod.grouped_expert_mlp(x, index, storage, slot_of, layout, act)
    monkeypatch.setattr(moe_gemv, "supports", lambda x, act_fn: moe_gemv.is_silu(act_fn))
    got = experts_mod.grouped_expert_mlp(x, index, storage, slot_of, layout, act)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1, 1], torch.zeros(H))
    alone = experts_mod.slot_expert_mlp(x[[0, 1]], *layout.split(storage[1]), act)  # expert 3 -> slot 1
    assert torch.equal(alone, torch.stack([got[0, 1], got[1, 0]]))
    one = experts_mod.grouped_expert_mlp(x[:1], index[:1], storage, slot_of, layout, act)  # T = 1: routed_mlp
    assert torch.equal(one[0], got[0])
    weights = torch.rand(3, 2, generator=gen)
    combined = experts_mod.combine_routes(got, weights, act)
    assert torch.allclose(combined, (got * weights[..., None]).sum(dim=1), rtol=1e-5, atol=1e-6)


def test_silu_is_recognised_in_torch_and_transformers_modules():
    from transformers.activations import ACT2FN

    assert moe_gemv.is_silu(nn.SiLU()) and moe_gemv.is_silu(ACT2FN["silu"])
    assert not moe_gemv.is_silu(nn.GELU()) and not moe_gemv.is_silu(ACT2FN["gelu"])


def test_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="valid: auto, torch"):
        moe_gemv.use("cutlass")


def test_serves_quantized_only_on_cuda_in_half_precision_with_silu_and_the_kernels_on():
    silu = torch.nn.SiLU()
    cuda = torch.device("cuda")
    assert not moe_gemv.serves_quantized(torch.device("cpu"), torch.bfloat16, silu)
    assert not moe_gemv.serves_quantized(cuda, torch.float32, silu)
    assert not moe_gemv.serves_quantized(cuda, torch.bfloat16, torch.nn.GELU())
    assert moe_gemv.serves_quantized(cuda, torch.bfloat16, silu) == (moe_gemv.triton is not None)
    try:
        moe_gemv.use("torch")
        assert not moe_gemv.serves_quantized(cuda, torch.bfloat16, silu)
    finally:
        moe_gemv.use("auto")
