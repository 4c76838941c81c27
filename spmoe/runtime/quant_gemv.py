"""
Weight-only int8 and int4 linear layers at decode shapes, as one Triton kernel per layer that reads each
quantized weight once.

A draft's decode forward feeds few rows (T <= `MAX_TOKENS`), so its linear layers are bound by reading
their weights. Dequantizing a weight into a workspace and then multiplying moves it several times (int8:
read 1 byte, write 2, read and write 2 to scale, read 2 in the matmul: 9 bytes per weight, against 2 for a
bf16 weight). Here each program loads a [BLOCK_N, BLOCK_K] tile of the quantized weight, dequantizes it in
registers and accumulates its dot with the rows in float32: 1 byte (int8) or half a byte (int4) per weight,
plus the scales.

Terms: x [T, I] rows; O output features. int8 (`spmoe.models.quantized_draft.quantize_rows`): q [O, I]
int8 and scale [O], w = q * scale. int4 (`spmoe.models.int4`): packed [O, I_pad / 2] uint8 (column 2j in the
low nibble of byte j, 2j + 1 in the high one), scale and offset [O, G] per group of g columns (g even,
I_pad = G * g), w = q * scale + offset; padding columns meet zero inputs.
Numerics: y = x w^T accumulated in float32 and rounded once to x's dtype, then the bias added in that dtype.
Not bit-equal to dequantize-then-matmul, which rounds each weight to the compute dtype first; within that
rounding. Callers are drafts, which only propose: the target verifies, so outputs stay lossless.
Two kernels per precision: one row (T = 1, each draft token's forward) is a GEMV: each program reduces
[BLOCK_N, BLOCK_K] tiles against the row in float32 without padding the row to a matrix tile; for int4 it
takes each group's dot with the raw 4-bit codes and applies the group's scale and offset once
(sum_k (q_k s + o) x_k = s sum_k q_k x_k + o sum_k x_k; needs a power-of-two group). 2..MAX_TOKENS rows
(a draft catching up on accepted tokens) multiply [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles with
`tl.dot`. Tile sizes, warps and pipeline stages per kernel are `LaunchConfig`s (`ROW_CONFIG`,
`TILE_CONFIG`; a caller may pass its own, as `experiments.sweep_quant_gemv` does).
Used where `supports` (CUDA, bf16 or fp16, T <= MAX_TOKENS, Triton importable, `hardware.expert_kernel`
"auto": the switch `spmoe.runtime.moe_gemv.use` sets for both modules' kernels); elsewhere the caller
dequantizes into its workspace. No host sync: CUDA graphs capture it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spmoe.runtime import moe_gemv

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_TOKENS = 16  # rows served here: one BLOCK_M tile
BLOCK_M = 16


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int  # output features per program
    block_k: int  # input features per loop step (a power of two)
    num_warps: int = 4
    num_stages: int = 3


ROW_CONFIG = {"int8": LaunchConfig(16, 1024), "int4": LaunchConfig(16, 1024)}  # one row (swept on an H200)
TILE_CONFIG = {"int8": LaunchConfig(32, 128), "int4": LaunchConfig(32, 128)}  # 2..MAX_TOKENS rows


def serves(device: str, kernel: str) -> bool:
    """Whether a run on `device` ("cuda", "cuda:1", "cpu") with `hardware.expert_kernel=kernel` runs its
    quantized drafts' decode forwards here (before any tensor exists: for planning)."""
    return triton is not None and kernel == "auto" and device.startswith("cuda")


def supports(x: torch.Tensor) -> bool:
    """Whether `int8_linear` / `int4_linear` serve inputs x [..., I]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (moe_gemv.enabled() and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and 0 < rows <= MAX_TOKENS)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                config: LaunchConfig | None = None) -> torch.Tensor:
    """x [..., I] -> [..., O]: x (q * scale[:, None])^T + bias; q [O, I] int8, scale [O]."""
    out_features, in_features = q.shape
    x2 = x.reshape(-1, in_features).contiguous()  # [T, I]
    rows = x2.shape[0]
    assert rows <= MAX_TOKENS and q.is_contiguous(), (x.shape, q.stride())
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)  # [T, O]
    b = bias if bias is not None else scale
    if rows == 1:
        c = config or ROW_CONFIG["int8"]
        _int8_row_kernel[(triton.cdiv(out_features, c.block_n),)](
            x2, q, scale, b, y, in_features, out_features, HAS_BIAS=bias is not None, BLOCK_N=c.block_n,
            BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        c = config or TILE_CONFIG["int8"]
        _int8_kernel[(triton.cdiv(out_features, c.block_n),)](
            x2, q, scale, b, y, rows, in_features, out_features, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M,
            BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    return y.view(*x.shape[:-1], out_features)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                in_features: int, bias: torch.Tensor | None, config: LaunchConfig | None = None) -> torch.Tensor:
    """x [..., I] -> [..., O] through the int4 weight (packed [O, I_pad / 2], scale and offset [O, G])."""
    out_features, half = packed.shape
    num_groups = scale.shape[1]
    group = 2 * half // num_groups  # g columns per group, even
    x2 = x.reshape(-1, in_features).contiguous()  # [T, I]
    rows = x2.shape[0]
    assert rows <= MAX_TOKENS and packed.is_contiguous() and scale.is_contiguous() and offset.is_contiguous()
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)  # [T, O]
    b = bias if bias is not None else scale
    if rows == 1 and group & (group - 1) == 0:
        c = config or ROW_CONFIG["int4"]
        block_k = max(c.block_k, group)  # powers of two: a whole number of groups per step
        _int4_row_kernel[(triton.cdiv(out_features, c.block_n),)](
            x2, packed, scale, offset, b, y, in_features, 2 * half, out_features, num_groups,
            HAS_BIAS=bias is not None, GROUP=group, BLOCK_N=c.block_n, BLOCK_K=block_k, num_warps=c.num_warps,
            num_stages=c.num_stages)
    else:
        c = config or TILE_CONFIG["int4"]
        _int4_kernel[(triton.cdiv(out_features, c.block_n),)](
            x2, packed, scale, offset, b, y, rows, in_features, 2 * half, out_features, num_groups, group,
            HAS_BIAS=bias is not None, ALIGNED=group % c.block_k == 0, BLOCK_M=BLOCK_M, BLOCK_N=c.block_n,
            BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    return y.view(*x.shape[:-1], out_features)


if triton is not None:
    @triton.jit
    def _finish(acc, y_ptr, bias_ptr, rows, cols, num_rows, out_features, HAS_BIAS: tl.constexpr):
        """Round the float32 tile [BLOCK_M, BLOCK_N] to y's dtype, add the bias in it, store the valid part."""
        col_ok = cols < out_features
        y = acc.to(y_ptr.dtype.element_ty)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(y_ptr.dtype.element_ty)[None, :]
        tl.store(y_ptr + rows[:, None] * out_features + cols[None, :], y,
                 mask=(rows[:, None] < num_rows) & col_ok[None, :])

    @triton.jit
    def _store_row(acc, y_ptr, bias_ptr, cols, out_features, HAS_BIAS: tl.constexpr):
        """Round the float32 row [BLOCK_N] to y's dtype, add the bias in it, store the valid part."""
        col_ok = cols < out_features
        y = acc.to(y_ptr.dtype.element_ty)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + cols, y, mask=col_ok)

    @triton.jit
    def _int8_row_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr, in_features, out_features,
                         HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row; program n: output columns [n * BLOCK_N, (n + 1) * BLOCK_N)."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < in_features
            xs = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            q = tl.load(q_ptr + cols[:, None].to(tl.int64) * in_features + k[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_N, BLOCK_K] int8
            acc += tl.sum(q.to(tl.float32) * xs[None, :], axis=1)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
        _store_row(acc * scale, y_ptr, bias_ptr, cols, out_features, HAS_BIAS)

    @triton.jit
    def _int4_row_kernel(x_ptr, p_ptr, scale_ptr, offset_ptr, bias_ptr, y_ptr, in_features, padded, out_features,
                         num_groups, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        """One row; each K step holds BLOCK_K / GROUP whole groups: per group the dot of the raw codes with the
        row, then scale * that + offset * the group's row sum."""
        SUB: tl.constexpr = BLOCK_K // GROUP
        HALF_G: tl.constexpr = GROUP // 2
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        half = padded // 2
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, padded, BLOCK_K):
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte index within a row
            even, odd = 2 * j, 2 * j + 1  # columns
            x_even = tl.load(x_ptr + even, mask=even < in_features, other=0.0).to(tl.float32)  # [BLOCK_K / 2]
            x_odd = tl.load(x_ptr + odd, mask=odd < in_features, other=0.0).to(tl.float32)
            p = tl.load(p_ptr + cols[:, None].to(tl.int64) * half + j[None, :],
                        mask=col_ok[:, None] & (j < half)[None, :], other=0)  # [BLOCK_N, BLOCK_K / 2] uint8
            qx = (p & 0xF).to(tl.float32) * x_even[None, :] + (p >> 4).to(tl.float32) * x_odd[None, :]
            qx = tl.sum(tl.reshape(qx, (BLOCK_N, SUB, HALF_G)), axis=2)  # [BLOCK_N, SUB]
            xg = tl.sum(tl.reshape(x_even + x_odd, (SUB, HALF_G)), axis=1)  # [SUB]
            g = k0 // GROUP + tl.arange(0, SUB)
            g_at = cols[:, None] * num_groups + g[None, :]  # [BLOCK_N, SUB]
            g_ok = col_ok[:, None] & (g < num_groups)[None, :]
            s = tl.load(scale_ptr + g_at, mask=g_ok, other=0.0).to(tl.float32)
            o = tl.load(offset_ptr + g_at, mask=g_ok, other=0.0).to(tl.float32)
            acc += tl.sum(s * qx + o * xg[None, :], axis=1)
        _store_row(acc, y_ptr, bias_ptr, cols, out_features, HAS_BIAS)

    @triton.jit
    def _int8_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr, num_rows, in_features, out_features,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program n: output columns [n * BLOCK_N, (n + 1) * BLOCK_N) of every row."""
        rows = tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < num_rows, cols < out_features
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < in_features
            xs = tl.load(x_ptr + rows[:, None] * in_features + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)  # [BLOCK_M, BLOCK_K]
            q = tl.load(q_ptr + cols[:, None].to(tl.int64) * in_features + k[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_N, BLOCK_K] int8
            acc = tl.dot(xs, tl.trans(q.to(xs.dtype)), acc)  # |q| <= 127: exact in bf16 and fp16
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
        _finish(acc * scale[None, :], y_ptr, bias_ptr, rows, cols, num_rows, out_features, HAS_BIAS)

    @triton.jit
    def _int4_kernel(x_ptr, p_ptr, scale_ptr, offset_ptr, bias_ptr, y_ptr, num_rows, in_features, padded,
                     out_features, num_groups, group, HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """As `_int8_kernel`; each K step takes BLOCK_K columns as BLOCK_K / 2 bytes: even columns from the low
        nibbles, odd ones from the high nibbles, each pair in one group (g is even). ALIGNED (g a multiple of
        BLOCK_K): a K step lies in one group, so its scale and offset are one value per row."""
        rows = tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < num_rows, cols < out_features
        half = padded // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, padded, BLOCK_K):
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte index within a row
            j_ok = j < half
            even, odd = 2 * j, 2 * j + 1  # columns
            x_rows = x_ptr + rows[:, None] * in_features
            x_even = tl.load(x_rows + even[None, :], mask=row_ok[:, None] & (even < in_features)[None, :], other=0.0)
            x_odd = tl.load(x_rows + odd[None, :], mask=row_ok[:, None] & (odd < in_features)[None, :], other=0.0)
            w_ok = col_ok[:, None] & j_ok[None, :]
            p = tl.load(p_ptr + cols[:, None].to(tl.int64) * half + j[None, :], mask=w_ok, other=0)  # [N, K/2] u8
            if ALIGNED:
                g = cols * num_groups + k0 // group  # [BLOCK_N]
                s = tl.load(scale_ptr + g, mask=col_ok, other=0.0).to(tl.float32)[:, None]
                o = tl.load(offset_ptr + g, mask=col_ok, other=0.0).to(tl.float32)[:, None]
            else:
                g = cols[:, None] * num_groups + even[None, :] // group  # [BLOCK_N, BLOCK_K / 2]
                s = tl.load(scale_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
                o = tl.load(offset_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
            w_even = ((p & 0xF).to(tl.float32) * s + o).to(x_even.dtype)
            w_odd = ((p >> 4).to(tl.float32) * s + o).to(x_odd.dtype)
            acc = tl.dot(x_even, tl.trans(w_even), acc)
            acc = tl.dot(x_odd, tl.trans(w_odd), acc)
        _finish(acc, y_ptr, bias_ptr, rows, cols, num_rows, out_features, HAS_BIAS)
