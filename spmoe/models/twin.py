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

A sparse draft (an MoE of the target's family with the same experts per layer and top-k, narrower experts: a
SlimMoE-style pruned draft such as Phi-mini-MoE for Phi-3.5-MoE) gives a *grown* twin: the target copies the
draft's routers too, and target expert e = draft expert e widened from I_d to I_t neurons. Its first I_d neurons
are the draft expert's (plus the noise above); the other I_t - I_d have gate/up rows drawn with the draft's gate/up
std and down columns drawn with `expert_noise` x the draft's down std x sqrt(I_d / (I_t - I_d)): together they add
about as much to an expert's output as the noise on its I_d copied down columns, so a grown twin diverges from its
draft as a same-width twin of the same `expert_noise` does, whatever the growth (Phi: 960 -> 6400 neurons); at zero
noise they add nothing and the target computes exactly the draft's function, with the draft's routing.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from spmoe.config import TwinConfig
from spmoe.models.experts import ExpertLayout
from spmoe.offload.store import ExpertStore

_MUST_MATCH = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "rope_parameters", "rms_norm_eps", "hidden_act", "sliding_window")


def sparse_experts(draft: PreTrainedModel, layer: int):
    """The draft layer's fused experts module (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), or None (dense)."""
    experts = getattr(draft.model.layers[layer].mlp, "experts", None)
    return experts if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj") else None


def check_twinnable(target: PreTrainedModel, draft: PreTrainedModel, layout: ExpertLayout) -> bool:
    """Raise, naming every mismatch, unless `draft` can twin `target`; whether it is sparse (its target grows)."""
    tc, dc = target.config, draft.config
    bad = [f"{k}: target {getattr(tc, k, None)} vs draft {getattr(dc, k, None)}"
           for k in _MUST_MATCH if getattr(tc, k, None) != getattr(dc, k, None)]
    experts = [sparse_experts(draft, layer) for layer in layout.moe_layers if layer < dc.num_hidden_layers]
    sparse = bool(experts) and all(e is not None for e in experts)
    if sparse:
        num_experts, width = experts[0].gate_up_proj.shape[0], experts[0].down_proj.shape[-1]
        if num_experts != layout.num_experts:
            bad.append(f"experts per layer: target {layout.num_experts} vs draft {num_experts}")
        if getattr(dc, "num_experts_per_tok", None) != layout.top_k:
            bad.append(f"experts per token: target {layout.top_k} vs draft {getattr(dc, 'num_experts_per_tok', None)}")
        if width > layout.intermediate_size:
            bad.append(f"expert width {layout.intermediate_size} vs a wider draft expert ({width})")
    elif dc.intermediate_size != layout.intermediate_size:
        bad.append(f"expert width {layout.intermediate_size} vs draft FFN width {dc.intermediate_size}")
    if bad:
        raise ValueError("model.weights=twin needs a structurally twinned draft; mismatched: " + "; ".join(bad))
    return sparse


@torch.no_grad()
def upcycle(target: PreTrainedModel, layout: ExpertLayout, store: ExpertStore, draft: PreTrainedModel,
            twin: TwinConfig, seed: int) -> None:
    """Copy the draft's shared weights (and a sparse draft's routers) into `target` and fill `store` with noisy
    copies of its FFNs (a sparse draft's experts, widened)."""
    sparse = check_twinnable(target, draft, layout)
    if twin.expert_noise < 0:
        raise ValueError(f"model.twin.expert_noise must be >= 0, got {twin.expert_noise}")
    target_state = target.state_dict()
    for name, tensor in draft.state_dict().items():
        if ".mlp.experts." in name or (".mlp." in name and not sparse):
            continue
        if name not in target_state or target_state[name].shape != tensor.shape:
            raise ValueError(f"twin: draft weight {name} {tuple(tensor.shape)} has no match in the target")
        target_state[name].copy_(tensor)
    device = next(draft.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    if sparse:
        _grow_experts(layout, store, draft, twin.expert_noise, gen)
        return
    for layer in layout.moe_layers:
        mlp = draft.model.layers[layer].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).to(layout.dtype)  # [2I, H]
        down = mlp.down_proj.weight.to(layout.dtype)  # [H, I]
        for e in range(layout.num_experts):
            gu_out, d_out = layout.split(store.flat((layer, e)))
            for src, dst in ((gate_up, gu_out), (down, d_out)):
                dst.copy_(_perturbed(src.float(), twin.expert_noise, gen).to(layout.dtype))


def _grow_experts(layout: ExpertLayout, store: ExpertStore, draft: PreTrainedModel, noise: float,
                  gen: torch.Generator) -> None:
    """Target expert e of each layer = the draft's expert e widened to the target's width (module docstring)."""
    i_t = layout.intermediate_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)

    for layer in layout.moe_layers:
        experts = sparse_experts(draft, layer)
        for e in range(layout.num_experts):
            gate_up_d = _perturbed(experts.gate_up_proj[e].float(), noise, gen)  # [2 I_d, H]: gate rows, then up rows
            down_d = experts.down_proj[e].float()  # [H, I_d]
            h, i_d = down_d.shape
            down_d_std = down_d.std()
            down_d = _perturbed(down_d, noise, gen)
            extra_gate_up = gate_up_d.std() * randn(2, i_t - i_d, h)  # the new neurons' gate and up rows
            gate, up = gate_up_d.view(2, i_d, h)
            gate_up = torch.cat([gate, extra_gate_up[0], up, extra_gate_up[1]])  # [2 I_t, H]
            extra_down_std = noise * down_d_std * (i_d / (i_t - i_d)) ** 0.5 if i_t > i_d else 0.0
            down = torch.cat([down_d, extra_down_std * randn(h, i_t - i_d)], dim=1)  # [H, I_t]
            gu_out, d_out = layout.split(store.flat((layer, e)))
            gu_out.copy_(gate_up.to(layout.dtype))
            d_out.copy_(down.to(layout.dtype))


def _perturbed(weight: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    """float32 `weight` + `noise` x its std x a seeded standard Gaussian of its shape (drawn from `gen`)."""
    draw = torch.randn(weight.shape, generator=gen, device=gen.device, dtype=torch.float32)
    return weight + noise * weight.std() * draw
