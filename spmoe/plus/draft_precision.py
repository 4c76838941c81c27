"""
Memory-aware draft: run the session's dense draft with int8 or int4 weight-only linear layers and
give the bytes this saves to the expert cache.

Terms: a *site* is one `nn.Linear` of the draft (attention, MLP, LM head), except one whose weight
is shared with an embedding (tied heads stay as they are) and anything inside an experts module.
Quantization is `spmoe.models.quantized_draft.quantize_rows` (int8, a scale per output row) or
`spmoe.models.int4` (int4, a scale and offset per group of input columns). At decode shapes on CUDA a
site runs `spmoe.runtime.quant_gemv`'s kernel, which reads its quantized weight once; elsewhere forward
dequantizes one [O, I] weight at a time in the compute dtype into the *workspace*: one byte buffer, allocated when the
draft is quantized and shared by all its sites (sized for the largest,
`spmoe.models.quantized_draft.matrix_workspace_bytes`). A forward then allocates nothing but its output,
so a captured draft graph's pool holds no per-site transients (with one transient per site, the pools of
the captured draft graphs kept them).
*Saved bytes* = site weight bytes - quantized bytes - workspace: what the memory plan counted for
the draft and the quantized draft no longer needs; the method turns them into expert slots.

Accounting: the quantized tensors are plain attributes, not parameters or buffers: they are
allocated by the method while it builds, so the session counts them in the run's allocation peak,
and not a second time as resident draft weights. The full-precision site modules are detached
from the model for the run (on an emulated budget they stand for weights a real card would not
hold; they stay on the device so that restoring is free) and put back by `restore`.
`estimate_precision` gives the same byte counts from shapes alone (a `meta` draft), for the draft
choice (`spmoe.plus.draft_choice`), which runs before the session loads weights.
Lossless: the draft only proposes; the target verifies, so outputs do not depend on precision.
`agreement` (greedy next-token agreement of the quantized and full-precision draft on the
full-precision draft's own greedy continuations of seeded random starts) estimates what quantization
costs in acceptance.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from spmoe.models import int4
from spmoe.models.experts import OffloadedExperts
from spmoe.models.quantized_draft import dequantize_rows_into, matrix_workspace_bytes, quantizable, quantize_rows
from spmoe.runtime import quant_gemv
from spmoe.spec.kv import cache_kwarg

log = logging.getLogger(__name__)
BITS = {"int8": 8, "int4": 4}


class QuantLinear(nn.Module):
    """A weight-only quantized stand-in for one `nn.Linear` (bits 8 or 4)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, workspace: torch.Tensor):
        super().__init__()
        w = linear.weight.data  # [O, I]
        self.bits, self.in_features, self.out_features = bits, linear.in_features, linear.out_features
        self.workspace = workspace  # uint8 [>= transient bytes], shared by the draft's sites
        if bits == 8:
            self.q, self.scale = quantize_rows(w)  # int8 [O, I], [O]
            self.offset = None
        else:
            self.q, self.scale, self.offset = int4.quantize(w, group_size)  # uint8 [O, I_pad / 2], [O, G] x 2
        self.bias_q = None if linear.bias is None else linear.bias.detach().clone()

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.q, self.scale, self.offset, self.bias_q) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if quant_gemv.supports(x):
            if self.bits == 8:
                return quant_gemv.int8_linear(x, self.q, self.scale, self.bias_q)
            return quant_gemv.int4_linear(x, self.q, self.scale, self.offset, self.in_features, self.bias_q)
        if self.bits == 8:
            w = dequantize_rows_into(self.q, self.scale, self.workspace, x.dtype)  # [O, I]
        else:
            w = int4.dequantize_into(self.q, self.scale, self.offset, self.in_features, self.workspace, x.dtype)
        return nn.functional.linear(x, w, self.bias_q)  # w [O, I], a view of the workspace


def _sites(module: nn.Module, shared: set[int]) -> list[tuple[nn.Module, str, nn.Linear]]:
    out = []
    for name, child in module.named_children():
        if quantizable(child):
            if id(child.weight) not in shared:
                out.append((module, name, child))
        elif not isinstance(child, OffloadedExperts):
            out.extend(_sites(child, shared))
    return out


@dataclass
class DraftPrecision:
    """The draft's linear layers swapped for quantized ones until `restore`."""

    precision: str
    site_bytes: int = 0  # full-precision weight bytes of the swapped sites
    quantized_bytes: int = 0
    workspace_bytes: int = 0
    agreement: float | None = None
    tried: dict = field(default_factory=dict)  # auto: precision -> calibration agreement
    _swapped: list = field(default_factory=list)  # (parent, name, original linear, quantized stand-in)

    @property
    def quantized(self) -> bool:
        return bool(self._swapped)

    @property
    def saved_bytes(self) -> int:
        return max(0, self.site_bytes - self.quantized_bytes - self.workspace_bytes)

    def restore(self) -> None:
        for parent, name, linear, _ in self._swapped:
            setattr(parent, name, linear)
        self._swapped.clear()

    @contextmanager
    def full_precision(self):
        """The original sites for the duration (e.g. a profiler that counts the draft's parameters)."""
        for parent, name, linear, _ in self._swapped:
            setattr(parent, name, linear)
        try:
            yield
        finally:
            for parent, name, _, q in self._swapped:
                setattr(parent, name, q)


def _quantized_site_bytes(linear: nn.Linear, bits: int, group_size: int) -> tuple[int, int, int]:
    """(full-precision weight bytes, quantized bytes, dequant transient bytes) of one site, from shapes only."""
    o, i, dsize = linear.out_features, linear.in_features, linear.weight.element_size()
    bias = 0 if linear.bias is None else linear.bias.numel() * linear.bias.element_size()
    quantized = o * i + o * dsize if bits == 8 else int4.int4_bytes(o, i, group_size, dsize)
    return o * i * dsize, quantized + bias, matrix_workspace_bytes(o, i, bits, group_size, dsize)


def estimate_precision(draft: nn.Module, precision: str, group_size: int = 128) -> DraftPrecision:
    """The byte counts `quantize_draft` would give, from shapes only (works on a `meta` draft); swaps nothing."""
    if precision == "bf16":
        return DraftPrecision("bf16")
    if precision not in BITS:
        raise ValueError(f"draft precision {precision!r}; valid: bf16, {', '.join(BITS)}")
    shared = {id(m.weight) for m in draft.modules() if isinstance(m, nn.Embedding)}
    out = DraftPrecision(precision)
    for _, _, linear in _sites(draft, shared):
        site, quantized, transient = _quantized_site_bytes(linear, BITS[precision], group_size)
        out.site_bytes += site
        out.quantized_bytes += quantized
        out.workspace_bytes = max(out.workspace_bytes, transient)
    return out


@torch.no_grad()
def quantize_draft(draft: nn.Module, precision: str, group_size: int = 128) -> DraftPrecision:
    """Swap the draft's sites for `precision` (bf16: nothing) quantized ones, in place."""
    if precision == "bf16":
        return DraftPrecision("bf16")
    if precision not in BITS:
        raise ValueError(f"draft precision {precision!r}; valid: bf16, {', '.join(BITS)}")
    bits = BITS[precision]
    shared = {id(m.weight) for m in draft.modules() if isinstance(m, nn.Embedding)}
    out = DraftPrecision(precision)
    sites = _sites(draft, shared)
    largest = max((_quantized_site_bytes(linear, bits, group_size)[2] for _, _, linear in sites), default=0)
    device = sites[0][2].weight.device if sites else torch.device("cpu")
    workspace = torch.empty(largest, dtype=torch.uint8, device=device)
    try:
        for parent, name, linear in sites:
            q = QuantLinear(linear, bits, group_size, workspace)
            out.site_bytes += linear.weight.numel() * linear.weight.element_size()
            out.quantized_bytes += q.nbytes
            out._swapped.append((parent, name, linear, q))
            setattr(parent, name, q)
    except BaseException:  # a partly quantized draft never outlives the failure
        out.restore()
        raise
    out.workspace_bytes = largest
    log.info("draft %s: %d linear layers, %.2f GB -> %.2f GB (+ %.2f GB workspace)", precision, len(out._swapped),
             out.site_bytes / 1e9, out.quantized_bytes / 1e9, largest / 1e9)
    return out


@torch.no_grad()
def greedy_continuation(draft: nn.Module, seeds: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """seeds [B, T0] followed by the draft's own greedy continuation: [B, T0 + num_tokens]. Text the
    draft generates itself is in distribution for it, unlike random tokens, on which near-uniform
    predictions make any quantization look like it flips the argmax."""
    kv = DynamicCache(config=draft.config)
    kw = {cache_kwarg(draft): kv}
    seq, step_in = seeds, seeds
    for _ in range(num_tokens):
        logits = draft(input_ids=step_in, use_cache=True, logits_to_keep=1, **kw).logits  # [B, 1, V]
        step_in = logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
        seq = torch.cat([seq, step_in], dim=1)
    return seq


@torch.no_grad()
def greedy_ids(draft: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    """Argmax next token at every position: sequences [B, T] -> [B, T]."""
    return draft(input_ids=sequences, use_cache=False).logits.argmax(dim=-1)


def agreement(draft: nn.Module, sequences: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of positions where `draft` picks the same greedy token as `reference` [B, T]."""
    return float((greedy_ids(draft, sequences) == reference).float().mean())


def choose_precision(draft: nn.Module, min_agreement: float, group_size: int, seeds: torch.Tensor,
                     num_tokens: int = 60, order: tuple[str, ...] = ("int4", "int8")) -> DraftPrecision:
    """The first precision of `order` (int4 / int8; default the cheapest first) whose greedy agreement
    with the full-precision draft, on the full-precision draft's own continuations of `seeds` [B, T0],
    is at least `min_agreement`, else bf16; the chosen one stays applied. `tried` records every agreement."""
    if not order:
        return DraftPrecision("bf16")
    sequences = greedy_continuation(draft, seeds, num_tokens)  # [B, T]
    reference = greedy_ids(draft, sequences)
    tried = {}
    for precision in order:
        applied = quantize_draft(draft, precision, group_size)
        try:
            applied.agreement = tried[precision] = agreement(draft, sequences, reference)
        except BaseException:
            applied.restore()
            raise
        log.info("draft %s: calibration agreement %.3f (need %.3f)", precision, applied.agreement, min_agreement)
        if applied.agreement >= min_agreement:
            applied.tried = tried
            return applied
        applied.restore()
    return DraftPrecision("bf16", agreement=1.0, tried=tried)
