"""
A quantized copy of the target as its own draft (`draft.copy_of_target=true`, DeepSeek-V2-Lite's
self-draft in SP-MoE, there an AWQ 4-bit copy).

Quantization (`draft.quant_bits`), weight-only, for every linear layer of the target (attention,
dense and shared MLPs, LM head) and for every routed expert; embeddings, norms and routers stay in
the target dtype:
  8: int8, symmetric, one scale per output row (round(w / s), s = max|w| / 127), ~1 byte/param;
  4: int4, asymmetric, one scale and offset per group of `draft.quant_group_size` input columns,
     two values per byte (layout in `spmoe.models.int4`), ~0.53 byte/param at groups of 128.
Weights are stored quantized on the device (so the budget sees their bytes). At decode shapes on CUDA a
linear layer runs `spmoe.runtime.quant_gemv`'s kernel, which reads its quantized weight once; elsewhere it
dequantizes per use into one workspace in the compute dtype, allocated with the copy and shared by
all its linear layers (within the planned `dequant_workspace_bytes`), so a forward allocates only its
outputs and a captured graph's pool keeps no per-layer transients. At decode shapes on the device, experts
run without a host sync (so the draft's whole forward is captured as one CUDA graph): int8 experts on CUDA
through `spmoe.runtime.moe_gemv`'s kernels, which read each int8 weight once; elsewhere (and int4) one token's
routed experts at a time dequantized into a transient. Longer inputs (the prefill) dequantize one expert at a
time after the routes reach the host. The whole draft is resident: its experts are served
from device buffers by `Int8ResidentExperts` / `Int4ResidentExperts` through the same
`OffloadedExperts` module as the target's, so the draft computes the target's function up to
quantization error (the knob that sets acceptance).
Not AWQ: plain round-to-nearest, no activation-aware scaling.
"""

from __future__ import annotations

import copy
import math
from typing import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from spmoe.models import int4
from spmoe.models.build import TargetModel
from spmoe.models.experts import OffloadedExperts, find_experts
from spmoe.runtime import moe_gemv, quant_gemv


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, I] -> (int8 [O, I], scale [O] in w's dtype)."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [O]
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def dequantize_rows_into(q: torch.Tensor, scale: torch.Tensor, workspace: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 q [O, I] with scale [O] -> w [O, I] in `dtype`, written at the start of `workspace` (uint8, at least
    `matrix_workspace_bytes`): cast, then scaled in place, so nothing is allocated."""
    o, i = q.shape
    w = workspace[:o * i * dtype.itemsize].view(dtype).view(o, i)  # [O, I]
    return w.copy_(q).mul_(scale.to(dtype)[:, None])


def matrix_workspace_bytes(out_features: int, in_features: int, bits: int, group_size: int, dsize: int) -> int:
    """Workspace bytes one quantized [O, I] matrix dequantizes into (int8: the weight; int4:
    `int4.workspace_bytes`)."""
    if bits == 8:
        return out_features * in_features * dsize
    return int4.workspace_bytes(out_features, in_features, group_size, dsize)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, workspace: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(linear.weight.data)
        self.register_buffer("weight_int8", q)  # [O, I]
        self.register_buffer("scale", scale)  # [O]
        self.bias = linear.bias
        self.workspace = workspace  # uint8, shared by the copy's linear layers (see the module docstring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if quant_gemv.supports(x):
            return quant_gemv.int8_linear(x, self.weight_int8, self.scale, self.bias)
        w = dequantize_rows_into(self.weight_int8, self.scale, self.workspace, x.dtype)  # [O, I]
        return nn.functional.linear(x, w, self.bias)


DEVICE_MAX_TOKENS = 16  # tokens per call that the resident experts' `device_routes` serve (every captured decode shape)


def _row_table(index: dict, layout, device: torch.device) -> torch.Tensor:
    """[L, E] long on `device`: the stacked row of each (layer, expert) key (0 where a layer has no experts)."""
    rows = torch.zeros(max(layout.moe_layers) + 1, layout.num_experts, dtype=torch.long)  # [L, E]
    for (layer, e), i in index.items():
        rows[layer, e] = i
    return rows.to(device)


def _token_routes(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, act_fn: nn.Module,
                  gate_up_scale: torch.Tensor | None = None, down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[A, H]: one token x [H] through its A routed experts, gate_up [A, 2I, H] and down [A, H, I], as two batched
    matmuls; row scales [A, 2I] / [A, H], where given, multiply the products."""
    top_k, h = down.shape[0], x.shape[-1]
    gu = torch.bmm(gate_up, x.expand(top_k, h).unsqueeze(-1)).squeeze(-1)  # [A, 2I]
    gate, up = (gu if gate_up_scale is None else gu * gate_up_scale).chunk(2, dim=-1)  # [A, I] each
    y = torch.bmm(down, (act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)  # [A, H]
    return y if down_scale is None else y * down_scale


def _routes_by_token(layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor, row_of: torch.Tensor,
                   num_experts: int, token_routes) -> torch.Tensor | None:
    """[T, A, H] (None when T > DEVICE_MAX_TOKENS): `token_routes(rows [A], x [H])` per token, its "no expert"
    routes (id E) zeroed. hidden_states [T, H]; top_k_index [T, A] ids in [0, E]."""
    num_tokens, top_k = top_k_index.shape
    if num_tokens > DEVICE_MAX_TOKENS:
        return None
    rows = row_of[layer][top_k_index.clamp(0, num_experts - 1)]  # [T, A]
    out = hidden_states.new_empty(num_tokens, top_k, hidden_states.shape[-1])  # [T, A, H]
    for t in range(num_tokens):
        out[t] = token_routes(rows[t], hidden_states[t])
    return out * (top_k_index < num_experts)[..., None]  # [T, A, H]


class Int8ResidentExperts(nn.Module):
    """Every routed expert of the target in int8 on the device; an ExpertProvider for the draft.

    Stacked over the K expert keys: `q` [K, N] int8 (gate_up [2I, H], then down [H, I], row-major) and `s`
    [K, 2I + H], one scale per row. Two ways to serve a layer:
    - `device_routes` (T <= DEVICE_MAX_TOKENS, the decode shapes): each route's row is looked up on the device; no
      device->host sync, so a CUDA graph captures the draft's experts with the rest of its forward. Where
      `moe_gemv.supports_quantized` (CUDA, bf16 or fp16, SiLU), its kernels read the routes' int8 rows straight
      from `q`, each weight once; elsewhere one token's A routed experts at a time are cast to the compute dtype
      into a transient [A, N] and run as two batched matmuls whose outputs take the row scales. The two agree
      within the compute dtype's rounding (the kernels scale float32 products), enough for a draft;
    - `experts_for` (any T, e.g. the prefill): one expert at a time, dequantized into a transient [N].
    Transients: A x N x (1 + dtype bytes) on the device path's fallback (through the kernels only the routes'
    [R, I] intermediate and the output), N x dtype bytes per expert otherwise (`dequant_workspace_bytes` plans
    the larger)."""

    def __init__(self, target: TargetModel, device: torch.device):
        super().__init__()
        layout = self.layout = target.layout
        h, inter = layout.hidden_size, layout.intermediate_size
        self.register_buffer("q", torch.empty(len(layout.keys), layout.expert_numel, dtype=torch.int8, device=device))
        self.register_buffer("s", torch.empty(len(layout.keys), 2 * inter + h, dtype=layout.dtype, device=device))
        self._index = {}
        for i, key in enumerate(layout.keys):
            gate_up, down = layout.split(target.store.flat(key))
            gu_q, gu_s = quantize_rows(gate_up.to(device))
            d_q, d_s = quantize_rows(down.to(device))
            self.q[i] = torch.cat([gu_q.flatten(), d_q.flatten()])
            self.s[i] = torch.cat([gu_s, d_s])
            self._index[key] = i
        self.row_of = _row_table(self._index, layout, device)  # a plain attribute: not in the planned quantized bytes

    def experts_for(self, layer: int, expert_ids: list[int], token_experts=None) -> Iterator[tuple[int, torch.Tensor]]:
        h, inter = self.layout.hidden_size, self.layout.intermediate_size
        for e in expert_ids:
            i = self._index[(layer, e)]
            q, s = self.q[i], self.s[i]
            flat = torch.empty(self.layout.expert_numel, dtype=s.dtype, device=q.device)  # [N], the one transient
            gu, dn = self.layout.split(flat)  # [2I, H], [H, I]
            gu.copy_(q[: 2 * inter * h].view(2 * inter, h)).mul_(s[: 2 * inter, None])
            dn.copy_(q[2 * inter * h:].view(h, inter)).mul_(s[2 * inter:, None])
            yield e, flat

    def device_routes(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      act_fn: nn.Module) -> torch.Tensor | None:
        """[T, A, H]: every route's expert output, all on the device; None when T > DEVICE_MAX_TOKENS.
        hidden_states [T, H]; top_k_index [T, A] ids in [0, E] (E, "no expert", gives a zero row)."""
        h, inter = self.layout.hidden_size, self.layout.intermediate_size
        if hidden_states.shape[0] <= DEVICE_MAX_TOKENS and moe_gemv.supports_quantized(hidden_states, act_fn):
            return moe_gemv.routes_mlp(hidden_states, top_k_index, self.row_of[layer], self.layout.num_experts,
                                       self.q, inter, scale=self.s)  # [T, A, H]

        def token_routes(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # row scales go on the products
            w = self.q[rows].to(x.dtype)  # [A, N], integer values
            scale = self.s[rows]  # [A, 2I + H]
            return _token_routes(w[:, :2 * inter * h].view(-1, 2 * inter, h), w[:, 2 * inter * h:].view(-1, h, inter),
                                 x, act_fn, scale[:, :2 * inter], scale[:, 2 * inter:])

        return _routes_by_token(layer, hidden_states, top_k_index, self.row_of, self.layout.num_experts, token_routes)


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int, workspace: torch.Tensor):
        super().__init__()
        packed, scale, offset = int4.quantize(linear.weight.data, group_size)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int4", packed)  # [O, I_pad / 2] uint8
        self.register_buffer("scale", scale)  # [O, G]
        self.register_buffer("offset", offset)  # [O, G]
        self.bias = linear.bias
        self.workspace = workspace  # uint8, shared by the copy's linear layers (see the module docstring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if quant_gemv.supports(x):
            return quant_gemv.int4_linear(x, self.weight_int4, self.scale, self.offset, self.in_features, self.bias)
        w = int4.dequantize_into(self.weight_int4, self.scale, self.offset, self.in_features, self.workspace, x.dtype)
        return nn.functional.linear(x, w, self.bias)  # w [O, I], a view of the workspace


class Int4ResidentExperts(nn.Module):
    """Every routed expert of the target in packed int4 on the device; an ExpertProvider for the draft.

    Stacked over experts (K = number of expert keys): `{gate_up,down}_{q,s,o}` = packed nibbles,
    scales and offsets of each expert's gate_up [2I, H] and down [H, I] (see `spmoe.models.int4`).
    Served as `Int8ResidentExperts` is: `device_routes` at decode shapes, `experts_for` otherwise."""

    def __init__(self, target: TargetModel, device: torch.device, group_size: int):
        super().__init__()
        layout = self.layout = target.layout
        self._index = {key: i for i, key in enumerate(layout.keys)}
        for name, (rows, cols) in self._mats().items():
            num_groups, g = int4.group_shape(cols, group_size)
            self.register_buffer(f"{name}_q", torch.empty(len(self._index), rows, num_groups * g // 2,
                                                          dtype=torch.uint8, device=device))  # [K, O, I_pad / 2]
            for part in ("s", "o"):
                self.register_buffer(f"{name}_{part}", torch.empty(len(self._index), rows, num_groups,
                                                                   dtype=layout.dtype, device=device))  # [K, O, G]
        for key, i in self._index.items():
            for name, w in zip(self._mats(), layout.split(target.store.flat(key))):
                for part, t in zip("qso", int4.quantize(w.to(device), group_size)):
                    getattr(self, f"{name}_{part}")[i] = t
        self.row_of = _row_table(self._index, layout, device)  # a plain attribute: not in the planned quantized bytes

    def _mats(self) -> dict[str, tuple[int, int]]:
        h, inter = self.layout.hidden_size, self.layout.intermediate_size
        return {"gate_up": (2 * inter, h), "down": (h, inter)}

    def experts_for(self, layer: int, expert_ids: list[int], token_experts=None) -> Iterator[tuple[int, torch.Tensor]]:
        for e in expert_ids:
            i = self._index[(layer, e)]
            flat = torch.empty(self.layout.expert_numel, dtype=self.layout.dtype, device=self.gate_up_q.device)
            for (name, (_, cols)), out in zip(self._mats().items(), self.layout.split(flat)):
                int4.dequantize(getattr(self, f"{name}_q")[i], getattr(self, f"{name}_s")[i],
                                getattr(self, f"{name}_o")[i], cols, self.layout.dtype, out=out)
            yield e, flat  # [N], the one transient

    def device_routes(self, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      act_fn: nn.Module) -> torch.Tensor | None:
        """As `Int8ResidentExperts.device_routes`: one token's A routed experts dequantized (their rows stacked
        as one [A O, I] matrix per kind) into transients and run as two batched matmuls."""
        def token_routes(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            mats = []
            for name, (out_features, cols) in self._mats().items():
                q, scale, offset = (getattr(self, f"{name}_{part}")[rows] for part in "qso")  # [A, O, .]
                top_k = q.shape[0]
                w = int4.dequantize(q.view(top_k * out_features, -1), scale.view(top_k * out_features, -1),
                                    offset.view(top_k * out_features, -1), cols, x.dtype)  # [A O, I]
                mats.append(w.view(top_k, out_features, cols))
            return _token_routes(*mats, x, act_fn)

        return _routes_by_token(layer, hidden_states, top_k_index, self.row_of, self.layout.num_experts, token_routes)


def _check_bits(bits: int) -> None:
    if bits not in (8, 4):
        raise ValueError(f"draft.quant_bits={bits!r}; valid: 8, 4")


def quantizable(module: nn.Module) -> bool:
    """Whether `module` is a plain linear layer, which a quantized one can stand in for. A subclass is not: it
    computes more than x W^T + b (PhiMoE's router returns its logits, routing weights and experts)."""
    return type(module) is nn.Linear


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if quantizable(child):
            setattr(module, name, make(child))
        elif not isinstance(child, OffloadedExperts):
            _replace_linears(child, make)


@torch.no_grad()
def build_quantized_copy(target: TargetModel, device: torch.device, bits: int = 8,
                         group_size: int = 128) -> PreTrainedModel:
    """The target's non-expert weights copied and quantized, its experts quantized from the store."""
    _check_bits(bits)
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
    workspace = torch.empty(linear_workspace_bytes(draft, target.layout.dtype, bits, group_size), dtype=torch.uint8,
                            device=device)
    if bits == 8:
        _replace_linears(draft, lambda linear: Int8Linear(linear, workspace))
        experts = Int8ResidentExperts(target, device)
    else:
        _replace_linears(draft, lambda linear: Int4Linear(linear, group_size, workspace))
        experts = Int4ResidentExperts(target, device, group_size)
    for module in slots.values():
        object.__setattr__(module, "provider", experts)  # a plain reference, not one submodule per layer
    draft.quantized_experts = experts  # registered once: its quantized bytes count as the draft's
    draft.dequant_workspace = workspace  # a plain attribute, not a buffer: the plan counts it as workspace
    return draft.eval()


def linear_workspace_bytes(model: nn.Module, dtype: torch.dtype, bits: int, group_size: int) -> int:
    """Bytes of the workspace every quantized linear layer of `model` dequantizes into: the largest
    [O, I] weight in `dtype`; for int4 the padded [O, I_pad] weight plus its nibble plane
    (`int4.workspace_bytes`)."""
    return max((matrix_workspace_bytes(m.out_features, m.in_features, bits, group_size, dtype.itemsize)
                for m in model.modules() if quantizable(m)), default=0)


def _matrix_bytes(out_features: int, in_features: int, dsize: int, bits: int, group_size: int) -> int:
    if bits == 8:
        return out_features * in_features + out_features * dsize  # int8 + one scale per row
    return int4.int4_bytes(out_features, in_features, group_size, dsize)


def quantized_copy_bytes(target: TargetModel, bits: int = 8, group_size: int = 128) -> int:
    """Bytes of the quantized copy, for planning before it is built: quantized linear weights with
    their scales, other non-expert tensors (embeddings, norms, routers) at the target dtype,
    quantized experts. Needs only shapes (works on a `meta` skeleton)."""
    _check_bits(bits)
    layout = target.layout
    dsize = layout.expert_bytes // layout.expert_numel
    linear = [m for m in target.model.modules() if quantizable(m)]
    linear_ids = {id(m.weight) for m in linear}
    other = {id(t): t for t in list(target.model.parameters()) + list(target.model.buffers()) if id(t) not in linear_ids}
    total = sum(_matrix_bytes(m.out_features, m.in_features, dsize, bits, group_size) for m in linear)
    total += sum(t.numel() * t.element_size() for t in other.values())
    h, inter = layout.hidden_size, layout.intermediate_size
    expert = _matrix_bytes(2 * inter, h, dsize, bits, group_size) + _matrix_bytes(h, inter, dsize, bits, group_size)
    return total + len(layout.keys) * expert


def dequant_workspace_bytes(target: TargetModel, bits: int = 8, group_size: int = 128,
                            int8_kernels: bool = False) -> int:
    """Device bytes a quantized copy's dequantization needs beside its quantized weights: the linear layers'
    shared workspace (`linear_workspace_bytes`: the LM head's, for DeepSeek-V2-Lite 0.42 GB), allocated with
    the copy, plus the experts' transient while they run, the larger of the device path's (one token's A routed
    experts: int8, their [A, N] rows and the same in the compute dtype, or with `int8_kernels` (where
    `moe_gemv.serves_quantized`) the kernels' [R, I] intermediate and [R, H] output for R = DEVICE_MAX_TOKENS x A
    routes; int4, their gathered nibbles, scales and offsets, dequantized padded weights, and one matrix's nibble
    plane) and the per-expert path's (one expert's [N] weights in the compute dtype; int4 adds the nibble plane of
    its larger matrix, and a padded matrix its own temporary before the copy into the expert's buffer)."""
    _check_bits(bits)
    layout = target.layout
    dsize = layout.expert_bytes // layout.expert_numel
    linear = linear_workspace_bytes(target.model, layout.dtype, bits, group_size)
    expert = layout.expert_numel * dsize
    if bits == 8 and int8_kernels:
        routes = DEVICE_MAX_TOKENS * layout.top_k
        expert = max(expert, routes * (layout.intermediate_size + layout.hidden_size) * dsize)
    elif bits == 8:
        expert = max(expert, layout.top_k * layout.expert_numel * (1 + dsize))
    if bits == 4:
        h, inter = layout.hidden_size, layout.intermediate_size

        def padded(o: int, i: int) -> int:
            return o * math.prod(int4.group_shape(i, group_size))

        mats = [(2 * inter, h), (h, inter)]
        expert += max(padded(o, i) // 2 + (padded(o, i) * dsize if padded(o, i) != o * i else 0) for o, i in mats)
        device = layout.top_k * (sum(padded(o, i) * dsize + padded(o, i) // 2  # dequantized, gathered nibbles
                                     + 2 * o * int4.group_shape(i, group_size)[0] * dsize for o, i in mats)
                                 + max(padded(o, i) // 2 for o, i in mats))  # one nibble plane at a time
        expert = max(expert, device)
    return linear + expert
