"""
Decode-shape expert MLPs as two Triton kernels that stream each routed slot's weights once.

A decode or verify step routes few tokens (T <= `MAX_TOKENS`), so each expert's matmul has one to
a few rows and is bound by reading its weights. `slot_mlp` computes every route's expert output
straight from the cache's slot storage: routes are grouped by slot (sorted on the device unless
already adjacent), the first route of each slot (its group's leader) computes all of that slot's
rows, reading the slot's weights once, and writes them at the routes' own positions; `combine`
then sums each token's routes with their weights. No host sync, so CUDA graphs capture both.

Terms: T tokens, A experts per token, R = T * A routes, H hidden, I expert intermediate, S slots,
N = 3 * I * H elements per slot (gate [I, H], up [I, H], then down [H, I], row-major).
Quantized slots (`scale` given; a quantized draft's resident experts, `spmoe.models.quantized_draft`): storage
[S, N] int8 in the same layout and scale [S, 2I + H], one per output row (gate, up, then down rows), w = q *
scale. Each int8 tile is cast to the activations' dtype in registers (exact: |q| <= 127), so a weight is read
once as one byte, and the row scales multiply the float32 products before they are rounded. Not bit-equal to
dequantize-then-matmul (which rounds each product before scaling); within that rounding, which a draft can
afford since the target verifies.
Invariants:
- a route's output row depends only on its token's hidden state and its slot's weights, not on
  which other routes share the launch: every row is computed with the same tile shapes and the
  same order of the H (then I) reduction. So one expert computed alone (`slot_mlp` over a single
  slot, the per-expert path) and the same expert inside a whole layer's launch give equal bits;
- the intermediate is rounded like transformers' eager experts: gate and up to the compute dtype
  (x's, the bf16 slots' own), SiLU of the rounded gate rounded, times up rounded;
- a route whose slot is negative ("no expert") gets a zero row.
Used for bf16 CUDA inputs when Triton imports and the activation is SiLU (`supports`; quantized slots
also fp16, `supports_quantized`); elsewhere the caller keeps torch's grouped GEMM (or dequantizes).
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_TOKENS = 16  # tokens per call served here: a slot's rows never exceed one tile of BLOCK_M
BLOCK_M = 16
_enabled = True


def use(kernel: str) -> None:
    """`hardware.expert_kernel`: "auto" serves decode shapes with the Triton kernels (here and in
    `spmoe.runtime.quant_gemv`), "torch" leaves them to torch's grouped GEMM (and quantized weights to
    dequantize-then-matmul)."""
    if kernel not in ("auto", "torch"):
        raise ValueError(f"expert kernel {kernel!r}; valid: auto, torch")
    global _enabled
    _enabled = kernel == "auto"


def enabled() -> bool:
    """Whether `hardware.expert_kernel` lets the Triton decode kernels serve (this module's and
    `spmoe.runtime.quant_gemv`'s)."""
    return _enabled


def supports(x: torch.Tensor, act_fn: nn.Module) -> bool:
    """Whether `slot_mlp` serves hidden states x [T, H] with this activation."""
    return (_enabled and triton is not None and x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] <= MAX_TOKENS
            and is_silu(act_fn))


def supports_quantized(x: torch.Tensor, act_fn: nn.Module) -> bool:
    """Whether `routes_mlp` with int8 slots (`scale` given) serves hidden states x [T, H] with this activation."""
    return serves_quantized(x.device, x.dtype, act_fn) and x.shape[0] <= MAX_TOKENS


def serves_quantized(device: torch.device, dtype: torch.dtype, act_fn: nn.Module) -> bool:
    """Whether `routes_mlp` with int8 slots serves decode shapes on `device` in `dtype` with this activation."""
    return (_enabled and triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and is_silu(act_fn))


_SILU: dict[type, bool] = {}


def is_silu(act_fn: nn.Module) -> bool:
    """Whether the activation computes SiLU (torch's or transformers' module), probed once per class."""
    cls = type(act_fn)
    if cls not in _SILU:
        probe = torch.linspace(-6.0, 6.0, 97)
        try:
            _SILU[cls] = bool(torch.allclose(act_fn(probe), nn.functional.silu(probe)))
        except (RuntimeError, TypeError):
            _SILU[cls] = False
    return _SILU[cls]


def slot_mlp(x: torch.Tensor, route_slots: torch.Tensor, top_k: int, storage: torch.Tensor,
             intermediate_size: int, grouped: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each route's expert output [R, H] in route order (route r = token r // top_k).

    x [T, H]; route_slots [R] the slot of each route (negative: no expert, a zero row); storage [S, N]
    slot buffers, rows of one slot contiguous (int8 with `scale` [S, 2I + H]: quantized slots). `grouped`:
    the caller guarantees that routes to one slot are adjacent in route order (one token's routes, whose
    experts are distinct; one expert's rows), so the sort is skipped."""
    num_routes, (num_tokens, hidden) = route_slots.numel(), x.shape
    assert num_tokens <= MAX_TOKENS and num_routes == num_tokens * top_k, (x.shape, route_slots.shape, top_k)
    if grouped:
        keys, order = route_slots, index_tensor("arange", num_routes, x.device)  # [R] each
    else:
        keys, order = torch.sort(route_slots, stable=True)  # [R] each: routes grouped by slot
    return _launch(x, keys, None, 0, order, top_k, storage, intermediate_size, scale)


def routed_mlp(x: torch.Tensor, top_k_index: torch.Tensor, slot_of: torch.Tensor, num_experts: int,
               storage: torch.Tensor, intermediate_size: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """`slot_mlp` for one token's routes, mapped to slots inside the kernels: [A, H].

    x [1, H]; top_k_index [1, A] distinct expert ids (ids outside [0, E): no expert, a zero row);
    slot_of [>= E] each expert's slot in storage [S, N] (int8 with `scale`, as in `slot_mlp`). No kernel
    besides the two matmuls."""
    num_tokens, top_k = top_k_index.shape
    assert num_tokens == 1 == x.shape[0], (x.shape, top_k_index.shape)
    ids = top_k_index.reshape(-1)  # [A]
    order = index_tensor("arange", top_k, x.device)  # [A]
    return _launch(x, ids, slot_of, num_experts, order, top_k, storage, intermediate_size, scale)


def routes_mlp(x: torch.Tensor, top_k_index: torch.Tensor, slot_of: torch.Tensor, num_experts: int,
               storage: torch.Tensor, intermediate_size: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Every route's expert output [T, A, H] from expert ids, all on the device: one token through
    `routed_mlp` (ids mapped in the kernels), more through `slot_mlp` (mapped, then sorted by slot).

    x [T, H]; top_k_index [T, A] ids in [0, E] (E, "no expert": a zero row), each token's distinct;
    slot_of [>= E] each expert's slot in storage [S, N] (int8 with `scale`, as in `slot_mlp`)."""
    num_tokens, top_k = top_k_index.shape
    if num_tokens == 1:  # one token's distinct experts: already grouped, mapped to slots in the kernels
        ys = routed_mlp(x, top_k_index, slot_of, num_experts, storage, intermediate_size, scale)  # [A, H]
    else:
        known = top_k_index < num_experts
        route_slots = torch.where(known, slot_of[top_k_index.clamp(max=num_experts - 1)], -1)  # [T, A]
        ys = slot_mlp(x, route_slots.flatten(), top_k, storage, intermediate_size, scale=scale)  # [R, H]
    return ys.view(num_tokens, top_k, x.shape[1])


def one_slot_mlp(x: torch.Tensor, slot: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """`slot_mlp` of every row of x [M, H] through the one slot buffer `slot` [1, N]: [M, H]."""
    return slot_mlp(x, index_tensor("zeros", x.shape[0], x.device), 1, slot, intermediate_size, grouped=True)


def _launch(x: torch.Tensor, keys: torch.Tensor, table: torch.Tensor | None, num_experts: int, order: torch.Tensor,
            top_k: int, storage: torch.Tensor, intermediate_size: int, scale: torch.Tensor | None) -> torch.Tensor:
    """The two kernels over routes `keys` [R] (slots grouped by slot; or with `table`, expert ids mapped
    to slots in the kernels) at route positions `order` [R]: [R, H] in route order. `scale` [S, 2I + H]:
    storage holds int8 slots, whose products take these row scales."""
    num_routes, hidden = keys.numel(), x.shape[1]
    assert storage.stride(1) == 1 and storage.shape[1] == 3 * intermediate_size * hidden, storage.shape
    scaled = scale is not None
    if scaled:
        assert storage.dtype == torch.int8 and scale.stride(1) == 1, (storage.dtype, scale.stride())
        assert scale.shape == (storage.shape[0], 2 * intermediate_size + hidden), (scale.shape, storage.shape)
    scale = scale if scaled else storage  # unread without SCALED
    x = x.contiguous()
    mid = torch.empty(num_routes, intermediate_size, dtype=x.dtype, device=x.device)  # [R, I] in grouped order
    out = torch.empty(num_routes, hidden, dtype=x.dtype, device=x.device)  # [R, H] in route order
    mapped = table is not None
    table = table if mapped else keys  # unread without MAP
    bn_up, bk_up, bn_down, bk_down = _blocks(hidden, intermediate_size)
    _gate_up_kernel[(triton.cdiv(intermediate_size, bn_up), num_routes)](
        x, keys, table, num_experts, order, storage, scale, mid, num_routes, top_k, hidden, intermediate_size,
        storage.stride(0), scale.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=bn_up, BLOCK_K=bk_up, MAP=mapped,
        SCALED=scaled, num_warps=4, num_stages=3)
    _down_kernel[(triton.cdiv(hidden, bn_down), num_routes)](
        mid, keys, table, num_experts, order, storage, scale, out, num_routes, hidden, intermediate_size,
        storage.stride(0), scale.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=bn_down, BLOCK_K=bk_down, MAP=mapped,
        SCALED=scaled, num_warps=4, num_stages=3)
    return out


def combine(ys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, H] in ys's dtype: sum over a of ys[t, a] * weights[t, a] in float32, added in order a = 0, 1, ...;
    ys [T, A, H], weights [T, A]. One kernel for what is otherwise two casts, a product and a sum."""
    num_tokens, top_k, hidden = ys.shape
    ys, weights = ys.contiguous(), weights.contiguous()
    out = torch.empty(num_tokens, hidden, dtype=ys.dtype, device=ys.device)
    _combine_kernel[(triton.cdiv(hidden, 1024), num_tokens)](ys, weights, out, top_k, hidden, BLOCK_H=1024)
    return out


_INDEX: dict[tuple[str, int, torch.device], torch.Tensor] = {}


def index_tensor(kind: str, n: int, device: torch.device) -> torch.Tensor:
    """[n] long on the device, 0..n-1 ("arange") or all 0 ("zeros"), cached (graphs may capture it)."""
    out = _INDEX.get((kind, n, device))
    if out is None:
        make = torch.arange if kind == "arange" else torch.zeros
        out = _INDEX[(kind, n, device)] = make(n, dtype=torch.long, device=device)
    return out


def _blocks(hidden: int, intermediate: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K) of the gate/up kernel, then of the down kernel: a function of the layout only,
    so every call on one model reduces in the same order."""
    return 64, 128, 32, 256


if triton is not None:
    @triton.jit
    def _slots(keys_ptr, table_ptr, offs, mask, num_experts, MAP: tl.constexpr):
        """The slots of routes `offs` (masked-out: -3): keys are slots, or with MAP expert ids looked up in
        table [E] (an id outside [0, E): -1, no expert)."""
        keys = tl.load(keys_ptr + offs, mask=mask, other=-3)
        if MAP:
            known = mask & (keys >= 0) & (keys < num_experts)
            keys = tl.where(known, tl.load(table_ptr + keys, mask=known, other=0), tl.where(mask, -1, -3))
        return keys

    @triton.jit
    def _group(keys_ptr, table_ptr, num_experts, num_routes, pid_r, BLOCK_M: tl.constexpr, MAP: tl.constexpr):
        """(slot, rows [BLOCK_M] of the grouped routes in this program's group, their mask, is leader)."""
        slot = _slots(keys_ptr, table_ptr, pid_r, pid_r < num_routes, num_experts, MAP)
        prev = _slots(keys_ptr, table_ptr, pid_r - 1, pid_r > 0, num_experts, MAP)
        prev = tl.where(pid_r > 0, prev, -2)
        rows = pid_r + tl.arange(0, BLOCK_M)
        same = _slots(keys_ptr, table_ptr, rows, rows < num_routes, num_experts, MAP) == slot
        lead = (slot != prev) & (slot >= 0)
        return slot, rows, same & (rows < num_routes), lead

    @triton.jit
    def _gate_up_kernel(x_ptr, keys_ptr, table_ptr, num_experts, order_ptr, w_ptr, scale_ptr, mid_ptr, num_routes,
                        top_k, hidden, inter, slot_stride, scale_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, MAP: tl.constexpr, SCALED: tl.constexpr):
        pid_n, pid_r = tl.program_id(0), tl.program_id(1)
        slot, rows, valid, lead = _group(keys_ptr, table_ptr, num_experts, num_routes, pid_r, BLOCK_M, MAP)
        if lead:
            tokens = tl.load(order_ptr + rows, mask=valid, other=0) // top_k  # [BM]
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of gate (and of up, + inter)
            col_ok = cols < inter
            base = w_ptr + slot.to(tl.int64) * slot_stride
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < hidden
                xs = tl.load(x_ptr + tokens[:, None] * hidden + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
                w_mask = col_ok[:, None] & k_ok[None, :]
                gate = tl.load(base + cols[:, None] * hidden + ks[None, :], mask=w_mask, other=0)  # [BN, BK]
                up = tl.load(base + (cols[:, None] + inter) * hidden + ks[None, :], mask=w_mask, other=0)
                acc_gate = tl.dot(xs, tl.trans(gate.to(xs.dtype)), acc_gate)  # int8 -> x's dtype: exact
                acc_up = tl.dot(xs, tl.trans(up.to(xs.dtype)), acc_up)
            if SCALED:
                scales = scale_ptr + slot.to(tl.int64) * scale_stride + cols  # [BN] gate rows' scales
                acc_gate *= tl.load(scales, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                acc_up *= tl.load(scales + inter, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            dtype = mid_ptr.dtype.element_ty
            g = acc_gate.to(dtype).to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            mid = (act * acc_up.to(dtype).to(tl.float32)).to(dtype)
            tl.store(mid_ptr + rows[:, None] * inter + cols[None, :], mid, mask=valid[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(mid_ptr, keys_ptr, table_ptr, num_experts, order_ptr, w_ptr, scale_ptr, out_ptr, num_routes,
                     hidden, inter, slot_stride, scale_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, MAP: tl.constexpr, SCALED: tl.constexpr):
        pid_n, pid_r = tl.program_id(0), tl.program_id(1)
        slot, rows, valid, lead = _group(keys_ptr, table_ptr, num_experts, num_routes, pid_r, BLOCK_M, MAP)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
        col_ok = cols < hidden
        dtype = out_ptr.dtype.element_ty
        if slot < 0:
            pos = tl.load(order_ptr + pid_r)
            tl.store(out_ptr + pos * hidden + cols, tl.zeros((BLOCK_N,), dtype=dtype), mask=col_ok)
        elif lead:
            base = w_ptr + slot.to(tl.int64) * slot_stride + 2 * inter * hidden
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < inter
                hs = tl.load(mid_ptr + rows[:, None] * inter + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(base + cols[:, None] * inter + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
                acc = tl.dot(hs, tl.trans(w.to(hs.dtype)), acc)
            if SCALED:
                scales = scale_ptr + slot.to(tl.int64) * scale_stride + 2 * inter + cols  # [BN] down rows' scales
                acc *= tl.load(scales, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            pos = tl.load(order_ptr + rows, mask=valid, other=0)  # [BM] route positions
            tl.store(out_ptr + pos[:, None] * hidden + cols[None, :], acc.to(dtype), mask=valid[:, None] & col_ok[None, :])

    @triton.jit
    def _combine_kernel(ys_ptr, w_ptr, out_ptr, top_k, hidden, BLOCK_H: tl.constexpr):
        pid_h, token = tl.program_id(0), tl.program_id(1)
        cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = cols < hidden
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for a in range(0, top_k):
            w = tl.load(w_ptr + token * top_k + a).to(tl.float32)
            y = tl.load(ys_ptr + (token * top_k + a) * hidden + cols, mask=ok, other=0.0).to(tl.float32)
            acc += y * w
        tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)
