"""
A quantized copy of the target as its own draft (`draft.copy_of_target=true`, DeepSeek-V2-Lite's
self-draft in SP-MoE, there an AWQ copy).

Quantization: int8 weight-only, symmetric, one scale per output row (round(w / s), s = max|w| / 127)
for every linear layer of the target (attention, dense and shared MLPs, LM head) and for every
routed expert; embeddings, norms and routers stay in the target dtype. Weights are stored in int8
on the device (so the budget sees int8 bytes) and dequantized per use into a temporary in the
compute dtype. The whole draft is resident: its experts are served from device int8 buffers by
`Int8ResidentExperts` through the same `OffloadedExperts` module as the target's, so the draft
computes the target's function up to quantization error (the knob that sets acceptance).
Not AWQ: no activation-aware scaling and no int4 packing (int8 halves the target's bytes; an 8 GB
DeepSeek-V2-Lite draft would need int4).
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from spmoe.models.build import TargetModel
from spmoe.models.experts import OffloadedExperts, find_experts


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, I] -> (int8 [O, I], scale [O] in w's dtype)."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [O]
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight.data)
        self.register_buffer("weight_int8", q)  # [O, I]
        self.register_buffer("scale", scale)  # [O]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype).mul_(self.scale.to(x.dtype)[:, None])  # [O, I], one transient
        return nn.functional.linear(x, w, self.bias)


class Int8ResidentExperts(nn.Module):
    """Every routed expert of the target in int8 on the device; an ExpertProvider for the draft."""

    def __init__(self, target: TargetModel, device: torch.device):
        super().__init__()
        layout = self.layout = target.layout
        self._index = {}
        for i, key in enumerate(layout.keys):
            gate_up, down = layout.split(target.store.flat(key))
            gu_q, gu_s = quantize_rows(gate_up.to(device))
            d_q, d_s = quantize_rows(down.to(device))
            self.register_buffer(f"q{i}", torch.cat([gu_q.flatten(), d_q.flatten()]))  # [N] int8
            self.register_buffer(f"s{i}", torch.cat([gu_s, d_s]))  # [2I + H]
            self._index[key] = i

    def experts_for(self, layer: int, expert_ids: list[int], token_experts=None) -> Iterator[tuple[int, torch.Tensor]]:
        h, inter = self.layout.hidden_size, self.layout.intermediate_size
        for e in expert_ids:
            i = self._index[(layer, e)]
            q, s = getattr(self, f"q{i}"), getattr(self, f"s{i}")
            gu = q[: 2 * inter * h].view(2 * inter, h).to(s.dtype) * s[: 2 * inter, None]  # [2I, H]
            dn = q[2 * inter * h:].view(h, inter).to(s.dtype) * s[2 * inter:, None]  # [H, I]
            yield e, torch.cat([gu.flatten(), dn.flatten()])


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        elif not isinstance(child, OffloadedExperts):
            _replace_linears(child)


@torch.no_grad()
def build_quantized_copy(target: TargetModel, device: torch.device) -> PreTrainedModel:
    """The target's non-expert weights copied and quantized, its experts quantized from the store."""
    hf_cfg = copy.deepcopy(target.model.config)
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(hf_cfg, dtype=target.layout.dtype, attn_implementation="sdpa")
    slots = {idx: OffloadedExperts(idx, target.layout, module.act_fn, provider=None)
             for idx, module in find_experts(draft).items()}
    for idx, module in slots.items():
        draft.model.layers[idx].mlp.experts = module
    draft.to_empty(device=device)
    draft.init_weights()  # non-persistent buffers (rotary); every weight is overwritten below
    draft.load_state_dict(target.model.state_dict(), strict=False)
    draft.tie_weights()
    _replace_linears(draft)
    experts = Int8ResidentExperts(target, device)
    for module in slots.values():
        object.__setattr__(module, "provider", experts)  # a plain reference, not one submodule per layer
    draft.quantized_experts = experts  # registered once: its int8 bytes count as the draft's
    return draft.eval()


def quantized_copy_bytes(target: TargetModel) -> int:
    """Bytes of the int8 copy, for planning before it is built: int8 linear weights + one scale per
    row, other non-expert tensors (embeddings, norms, routers) at the target dtype, int8 experts."""
    layout = target.layout
    dsize = layout.expert_bytes // layout.expert_numel
    linear = [m for m in target.model.modules() if isinstance(m, nn.Linear)]
    linear_ids = {id(m.weight) for m in linear}
    other = {id(t): t for t in list(target.model.parameters()) + list(target.model.buffers()) if id(t) not in linear_ids}
    total = sum(m.weight.numel() + m.out_features * dsize for m in linear)
    total += sum(t.numel() * t.element_size() for t in other.values())
    rows = 2 * layout.intermediate_size + layout.hidden_size
    return total + len(layout.keys) * (layout.expert_numel + rows * dsize)


def dequant_workspace_bytes(target: TargetModel) -> int:
    """The largest transient of an int8 forward: one dequantized [O, I] weight in the compute dtype
    (the LM head, for DeepSeek-V2-Lite 0.42 GB), planned on top of the int8 bytes."""
    layout = target.layout
    dsize = layout.expert_bytes // layout.expert_numel
    linear = max((m.weight.numel() for m in target.model.modules() if isinstance(m, nn.Linear)), default=0)
    return max(linear, layout.expert_numel) * dsize
