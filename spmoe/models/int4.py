"""
Group-wise asymmetric int4 weight-only quantization of [O, I] matrices, packed two values per byte.

Layout: the input dim I is cut into `num_groups = ceil(I / group_size)` equal groups of `g` columns,
`g = ceil(I / num_groups)` rounded up to even (so g <= group_size for an even group_size, and
g = I or I + 1 when I <= group_size); the row is padded on the right to `I_pad = num_groups * g` by
repeating its last column (padding never widens a group's range). Per (row, group):
`offset = min`, `scale = (max - offset) / 15`, both stored in the compute dtype, and
`q = round((w - offset) / scale)` clamped to [0, 15]. Packed: byte j of a row holds q[2j] in its low
nibble and q[2j + 1] in its high nibble, so the device holds `packed [O, I_pad / 2] uint8` +
`scale, offset [O, num_groups]`: about 0.5 byte/param + 2 x dtype bytes per group.

`dequantize_into` writes the padded weight into a caller's workspace (`workspace_bytes`: the weight, then
the nibble plane) and returns its [O, I] view: nothing is allocated, as a captured CUDA graph needs.

Invariants: unpack(pack(q)) == q exactly; |dequantize(quantize(w)) - w| <= scale / 2 per group (up
to the stored dtype's rounding of scale and offset); the padding columns are dropped on dequantize.
Not AWQ or GPTQ: plain round-to-nearest, no activation-aware scaling, no error feedback.
"""

from __future__ import annotations

import math

import torch

LEVELS = 15  # q in [0, 15]


def group_shape(in_features: int, group_size: int) -> tuple[int, int]:
    """(num_groups, g): equal even groups of g <= group_size columns covering in_features."""
    num_groups = -(-in_features // group_size)
    g = -(-in_features // num_groups)
    return num_groups, g + g % 2


def int4_bytes(out_features: int, in_features: int, group_size: int, dtype_bytes: int) -> int:
    """Device bytes of one quantized [O, I] matrix: packed nibbles + scale and offset per group."""
    num_groups, g = group_shape(in_features, group_size)
    return out_features * (num_groups * g // 2 + 2 * num_groups * dtype_bytes)


def pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2n] of values in [0, 15] -> uint8 [..., n]: q[2j] low nibble, q[2j + 1] high."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> uint8 [..., 2n] (inverse of `pack`)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [O, I] -> (packed uint8 [O, I_pad / 2], scale [O, G], offset [O, G]), scales in w's dtype."""
    out_features, in_features = w.shape
    num_groups, g = group_shape(in_features, group_size)
    wf = w.float()
    pad = num_groups * g - in_features
    if pad:
        wf = torch.cat([wf, wf[:, -1:].expand(out_features, pad)], dim=1)  # [O, I_pad]
    wf = wf.view(out_features, num_groups, g)  # [O, G, g]
    offset = wf.amin(dim=-1).to(w.dtype)  # [O, G]
    scale = ((wf.amax(dim=-1) - offset.float()) / LEVELS).clamp(min=torch.finfo(w.dtype).tiny).to(w.dtype)
    q = torch.round((wf - offset.float()[..., None]) / scale.float()[..., None]).clamp_(0, LEVELS)
    return pack(q.to(torch.uint8).view(out_features, -1)), scale, offset


def dequantize(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, in_features: int,
               dtype: torch.dtype, out: torch.Tensor | None = None,
               nibbles: torch.Tensor | None = None) -> torch.Tensor:
    """(packed [O, I_pad / 2], scale [O, G], offset [O, G]) -> w [O, I] in `dtype`, unpacked with bit
    ops on packed's device. `out` [O, I] (contiguous) receives w when given; `nibbles` (uint8, packed's
    shape) holds the nibble plane when given: with both and I unpadded, nothing is allocated."""
    out_features, num_groups = scale.shape
    i_pad = 2 * packed.shape[1]
    g = i_pad // num_groups
    if out is not None and i_pad == in_features:
        w = out.view(out_features, num_groups, g)
    else:
        w = torch.empty(out_features, num_groups, g, dtype=dtype, device=packed.device)
    p = packed.view(out_features, num_groups, g // 2)  # [O, G, g/2]
    if nibbles is None:
        nibbles = torch.empty_like(packed)
    plane = nibbles.view(out_features, num_groups, g // 2)
    w[..., 0::2] = torch.bitwise_and(p, 0xF, out=plane)
    w[..., 1::2] = torch.bitwise_right_shift(p, 4, out=plane)
    w.mul_(scale.to(dtype)[..., None]).add_(offset.to(dtype)[..., None])  # [O, G, g]
    w = w.view(out_features, i_pad)[:, :in_features]  # [O, I]
    if out is None:
        return w
    if w.data_ptr() != out.data_ptr():  # padded: drop the padding columns
        out.copy_(w)
    return out


def workspace_bytes(out_features: int, in_features: int, group_size: int, dsize: int) -> int:
    """Bytes `dequantize_into` needs for one [O, I] matrix: the padded weight [O, I_pad] in the compute
    dtype (dsize bytes per value), then its nibble plane (uint8 [O, I_pad / 2])."""
    padded = out_features * math.prod(group_shape(in_features, group_size))
    return padded * dsize + padded // 2


def dequantize_into(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, in_features: int,
                    workspace: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` into `workspace` (uint8, at least `workspace_bytes`): w [O, I] in `dtype`, a view of the
    padded weight written at the workspace's start (row stride I_pad when I was padded). Allocates nothing."""
    out_features, i_pad = packed.shape[0], 2 * packed.shape[1]
    w_bytes = out_features * i_pad * dtype.itemsize
    w = workspace[:w_bytes].view(dtype).view(out_features, i_pad)  # [O, I_pad]
    nibbles = workspace[w_bytes:w_bytes + packed.numel()].view(packed.shape)  # uint8 [O, I_pad / 2]
    dequantize(packed, scale, offset, i_pad, dtype, out=w, nibbles=nibbles)
    return w[:, :in_features]
