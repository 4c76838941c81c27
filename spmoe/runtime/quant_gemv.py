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
Used where `supports` (CUDA, bf16 or fp16, T <= MAX_TOKENS, Triton importable, `hardware.expert_kernel`
"auto": the switch `spmoe.runtime.moe_gemv.use` sets for both modules' kernels); elsewhere the caller
dequantizes into its workspace. No host sync: CUDA graphs capture it.
"""

from __future__ import annotations

import torch

from spmoe.runtime import moe_gemv

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_TOKENS = 16  # rows served here: one BLOCK_M tile
BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 128


def serves(device: str, kernel: str) -> bool:
    """Whether a run on `device` ("cuda", "cuda:1", "cpu") with `hardware.expert_kernel=kernel` runs its
    quantized drafts' decode forwards here (before any tensor exists: for planning)."""
    return triton is not None and kernel == "auto" and device.startswith("cuda")


def supports(x: torch.Tensor) -> bool:
    """Whether `int8_linear` / `int4_linear` serve inputs x [..., I]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (moe_gemv.enabled() and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and 0 < rows <= MAX_TOKENS)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., I] -> [..., O]: x (q * scale[:, None])^T + bias; q [O, I] int8, scale [O]."""
    out_features, in_features = q.shape
    x2 = x.reshape(-1, in_features).contiguous()  # [T, I]
    assert x2.shape[0] <= MAX_TOKENS and q.is_contiguous(), (x.shape, q.stride())
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)  # [T, O]
    _int8_kernel[(triton.cdiv(out_features, BLOCK_N),)](
        x2, q, scale, bias if bias is not None else scale, y, x2.shape[0], in_features, out_features,
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.view(*x.shape[:-1], out_features)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., I] -> [..., O] through the int4 weight (packed [O, I_pad / 2], scale and offset [O, G])."""
    out_features, half = packed.shape
    num_groups = scale.shape[1]
    group = 2 * half // num_groups  # g columns per group, even
    x2 = x.reshape(-1, in_features).contiguous()  # [T, I]
    assert x2.shape[0] <= MAX_TOKENS and packed.is_contiguous() and scale.is_contiguous() and offset.is_contiguous()
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)  # [T, O]
    _int4_kernel[(triton.cdiv(out_features, BLOCK_N),)](
        x2, packed, scale, offset, bias if bias is not None else scale, y, x2.shape[0], in_features, 2 * half,
        out_features, num_groups, group, HAS_BIAS=bias is not None, ALIGNED=group % BLOCK_K == 0, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
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
