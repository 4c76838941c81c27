"""spmoe.trace.layer_probe on tiny transformers models of every supported family (CPU, float32): the
parts it records add up to each layer's output, its hooks change nothing, and `first_differing_part`
names the first differing part in the layer's order."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from spmoe.trace.layer_probe import PART_ORDER, LayerParts, LayerProbe, first_differing_part
from tests.tiny_families import FAMILIES, tiny_hf_config

T, H, A = 5, 32, 2  # tokens, hidden (tiny_hf_config), experts per token


def _model(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_hf_config(family, num_layers=2, num_experts=4)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_add_up_to_each_layer_output(family):
    model = _model(family)
    ids = torch.arange(T)[None]  # [1, T]
    with torch.no_grad(), LayerProbe(model, parts=True) as probe:
        out = model(ids, output_hidden_states=True)
    assert len(probe.forwards) == len(probe.parts) == 1 and len(probe.parts[0]) == 2
    inputs = [h[0] for h in out.hidden_states[:2]]  # [T, H] each: the embeddings, layer 0's output
    for i, (x, parts, layer_out) in enumerate(zip(inputs, probe.parts[0], probe.forwards[0])):
        assert torch.equal(x + parts.attn + parts.moe_out, layer_out)  # the residual adds, in their order
        dense = family == "deepseek_v2" and i == 0  # first_k_dense_replace=1
        if dense:
            assert parts.routes is None and parts.weights is None and parts.experts_out is None
            continue
        assert parts.routes.shape == (T, A) and not parts.routes.is_floating_point()
        assert parts.weights.shape == (T, A)
        assert parts.experts_in.shape == parts.experts_out.shape == parts.attn.shape == (T, H)
        if family == "mixtral":
            assert torch.equal(parts.experts_out, parts.moe_out)  # no shared experts


def test_default_records_outputs_only_and_hooks_change_nothing():
    model = _model("mixtral")
    ids = torch.arange(T)[None]  # [1, T]
    with torch.no_grad():
        plain = model(ids).logits
        with LayerProbe(model) as outputs_only:
            model(ids)
        with LayerProbe(model, max_forwards=1, parts=True) as probe:
            probed = model(ids).logits
            model(ids[:, :2])  # past max_forwards: not recorded
    assert torch.equal(plain, probed)
    assert outputs_only.parts == [] and len(outputs_only.forwards) == 1
    assert len(probe.forwards) == len(probe.parts) == 1
    assert all(torch.equal(a, b) for a, b in zip(outputs_only.forwards[0], probe.forwards[0]))
    assert not model.model.layers[0].mlp.experts._forward_pre_hooks  # closed


def _parts() -> LayerParts:
    g = torch.Generator().manual_seed(0)
    return LayerParts(attn=torch.randn(T, H, generator=g), experts_in=torch.randn(T, H, generator=g),
                      routes=torch.randint(0, 4, (T, A), generator=g), weights=torch.rand(T, A, generator=g),
                      experts_out=torch.randn(T, H, generator=g), moe_out=torch.randn(T, H, generator=g))


def test_first_differing_part_in_the_layers_order():
    ref = _parts()
    assert first_differing_part(_parts(), ref) is None
    assert first_differing_part(LayerParts(attn=ref.attn), ref) is None  # parts one side lacks are skipped
    for name in PART_ORDER:
        m = _parts()
        getattr(m, name)[1, 1] += 1
        getattr(m, "moe_out")[0, 0] += 0.5  # a later part differs too
        part, diff = first_differing_part(m, ref)
        assert part == name and diff == pytest.approx(1.0)
    m = _parts()
    m.experts_out[0, 0] = float("nan")
    assert first_differing_part(m, ref)[0] == "experts_out"
