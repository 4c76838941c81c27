"""
Twinned pairs by construction (`model.weights=twin`): a target MoE upcycled from its dense draft,
as Mixtral was from Mistral-7B.

The target copies the draft's embeddings, attention, norms and LM head; every expert of every
layer is the draft's FFN of that layer plus `expert_noise` x a seeded Gaussian whose std equals
that FFN weight's std (drawn independently per expert). Routers keep their own random init.
With `expert_noise = 0` every expert equals the draft FFN and, since the top-k weights sum to
one, the target computes exactly the draft's function (acceptance 1 up to float rounding); the
noise sets how far target and draft diverge, and how much routing matters.

Requires structural twins: same depth, hidden size, attention shapes, RoPE, norm epsilon,
activation and vocabulary, and the draft FFN width equal to the expert width.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from spmoe.config import TwinConfig
from spmoe.models.experts import ExpertLayout
from spmoe.offload.store import ExpertStore

_MUST_MATCH = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "rope_parameters", "rms_norm_eps", "hidden_act", "sliding_window")


def check_twinnable(target: PreTrainedModel, draft: PreTrainedModel, layout: ExpertLayout) -> None:
    tc, dc = target.config, draft.config
    bad = [f"{k}: target {getattr(tc, k, None)} vs draft {getattr(dc, k, None)}"
           for k in _MUST_MATCH if getattr(tc, k, None) != getattr(dc, k, None)]
    if dc.intermediate_size != layout.intermediate_size:
        bad.append(f"expert width {layout.intermediate_size} vs draft FFN width {dc.intermediate_size}")
    if bad:
        raise ValueError("model.weights=twin needs a structurally twinned draft; mismatched: " + "; ".join(bad))


@torch.no_grad()
def upcycle(target: PreTrainedModel, layout: ExpertLayout, store: ExpertStore, draft: PreTrainedModel,
            twin: TwinConfig, seed: int) -> None:
    """Copy the draft's shared weights into `target` and fill `store` with noisy copies of its FFNs."""
    check_twinnable(target, draft, layout)
    if twin.expert_noise < 0:
        raise ValueError(f"model.twin.expert_noise must be >= 0, got {twin.expert_noise}")
    target_state = target.state_dict()
    for name, tensor in draft.state_dict().items():
        if ".mlp." in name:
            continue
        if name not in target_state or target_state[name].shape != tensor.shape:
            raise ValueError(f"twin: draft weight {name} {tuple(tensor.shape)} has no match in the target")
        target_state[name].copy_(tensor)
    device = next(draft.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    for layer in layout.moe_layers:
        mlp = draft.model.layers[layer].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).to(layout.dtype)  # [2I, H]
        down = mlp.down_proj.weight.to(layout.dtype)  # [H, I]
        for e in range(layout.num_experts):
            gu_out, d_out = layout.split(store.flat((layer, e)))
            for src, dst in ((gate_up, gu_out), (down, d_out)):
                noise = torch.randn(src.shape, generator=gen, device=device, dtype=torch.float32)
                dst.copy_((src.float() + twin.expert_noise * src.float().std() * noise).to(layout.dtype))
