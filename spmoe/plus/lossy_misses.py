"""
Labelled-lossy low-precision misses: spmoe_plus's optional part 5 (`method.plus.lossy_misses`, which
is off, int8 or int4; the default is off).

Terms: a *lossy miss* is an on-demand load (a miss that the prefetcher did not cover) at a MoE layer
past the SP-MoE cutoff. Instead of the expert's weights in the store's dtype, it copies a weight-only
quantized copy and dequantizes it on the device into the slot. The quantizers are the quantized
draft's: `spmoe.models.quantized_draft.quantize_rows` (int8, one scale per output row) and
`spmoe.models.int4` (int4, a scale and an offset per group of `group_size` input columns).

Host copy (`LowPrecisionExperts`): every expert of the lossy layers, quantized once when the runtime
is built (rows in chunks of about CHUNK_NUMEL weights on the run's device, so the transient stays
small). Each expert is one contiguous byte range: the scales (and the int4 offsets) come first, then
the int8 values or the int4 nibbles of gate_up [2I, H] and down [H, I]. On CUDA the range is
page-locked (registered). A lossy miss moves exactly `bytes_per_expert` bytes, and that is what
`h2d_bytes` counts. For int8 that is 3IH + (2I + H) x the dtype's bytes; for int4 it is the packed
nibbles plus a scale and an offset per group. Built only when the host can hold the store, the copy
and HOST_MARGIN_BYTES for the rest of the process (a Mixtral store of 84 GiB plus an int8 copy of 26
layers, 34 GiB, does not fit 128 GiB with that margin; int4's 18 GiB does).

Device path (`LossyMissTransfer`, a decorator of the provider's `TransferEngine`): a demand load
whose source is an expert of a lossy layer copies its low-precision bytes into one device staging
buffer. The load's `finish` step then dequantizes them into the slot on the demand copy stream, so the
slot's ready event covers the dequantization, and that stream orders the staging buffer's reuse. The
staging buffer takes one expert slot of the budget (`staging_slots`). Prefetches and demand loads at
layers up to the cutoff stay exact.

Slot bookkeeping: a slot loaded lossily is marked lossy until an exact load overwrites it. A later hit
on it is **accepted and counted**: the dequantized copy keeps serving (it is not reloaded), and every
expert computation served from a lossy slot counts in `LossyStats.num_lossy_computes` (the load's
own use plus later hits).

A run in which any expert computation used a lossy copy is not lossless by construction: its summary
says `lossless: false` with the reason (`lossy_reason`, see `spmoe.trace.lossless.declare_lossy`) and
keeps the self-check's token agreement. A run that never used one (every lossy-layer expert was
prefetched, resident or computed on the host) is judged by its tokens like any other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from spmoe.models import int4
from spmoe.models.experts import ExpertLayout
from spmoe.models.quantized_draft import quantize_rows
from spmoe.offload.host_memory import (
    PROCESS_ALLOWANCE_BYTES,
    HostMemoryError,
    _meminfo_bytes,
    host_bytes_available,
)
from spmoe.offload.store import ExpertStore, _register
from spmoe.offload.transfer import TransferEngine
from spmoe.types import ExpertKey

log = logging.getLogger(__name__)
PRECISIONS = ("int8", "int4")
CHUNK_NUMEL = 8 * 2**20  # weights quantized per device chunk (float32 transients of ~100 MB)
ALIGN_BYTES = 16  # each expert's byte range starts at a multiple of this
HOST_MARGIN_BYTES = 8 * 2**30  # beside store and copy: CUDA context, model skeletons, allocator slack


@dataclass(frozen=True)
class Region:
    """One tensor inside an expert's byte range."""

    name: str  # gate_up_q | gate_up_s | gate_up_o | down_q | down_s | down_o
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the expert's range

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        """This region of an expert's uint8 byte range `buf`, as a tensor of its dtype and shape."""
        return buf[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


def regions(layout: ExpertLayout, precision: str, group_size: int) -> list[Region]:
    """An expert's byte layout: scales (and int4 offsets) first, so that every region is aligned."""
    if precision not in PRECISIONS:
        raise ValueError(f"method.plus.lossy_misses={precision!r}; valid: off, {', '.join(PRECISIONS)}")
    h, inter, dtype = layout.hidden_size, layout.intermediate_size, layout.dtype
    mats = {"gate_up": (2 * inter, h), "down": (h, inter)}
    specs = []
    for name, (rows, cols) in mats.items():
        if precision == "int8":
            specs.append((f"{name}_s", dtype, (rows,)))
        else:
            num_groups, _ = int4.group_shape(cols, group_size)
            specs += [(f"{name}_s", dtype, (rows, num_groups)), (f"{name}_o", dtype, (rows, num_groups))]
    for name, (rows, cols) in mats.items():
        if precision == "int8":
            specs.append((f"{name}_q", torch.int8, (rows, cols)))
        else:
            num_groups, g = int4.group_shape(cols, group_size)
            specs.append((f"{name}_q", torch.uint8, (rows, num_groups * g // 2)))
    out, offset = [], 0
    for name, dtype_, shape in specs:
        region = Region(name, dtype_, shape, offset)
        out.append(region)
        offset += region.nbytes
    return out


def bytes_per_expert(layout: ExpertLayout, precision: str, group_size: int) -> int:
    last = regions(layout, precision, group_size)[-1]
    return last.offset + last.nbytes


def staging_slots(layout: ExpertLayout, precision: str, group_size: int) -> int:
    """Expert slots the device staging buffer takes from the budget."""
    return -(-bytes_per_expert(layout, precision, group_size) // layout.expert_bytes)


def dequantize_into(staged: torch.Tensor, out: torch.Tensor, layout: ExpertLayout, precision: str,
                    group_size: int, layout_regions: list[Region] | None = None) -> None:
    """staged: one expert's uint8 byte range [B]; out: its flat weights [N] in the layout's dtype.
    `layout_regions`: `regions(layout, precision, group_size)` when the caller holds them already."""
    parts = {r.name: r.view(staged) for r in layout_regions or regions(layout, precision, group_size)}
    for name, w in zip(("gate_up", "down"), layout.split(out)):  # [2I, H], [H, I] views of out
        if precision == "int8":
            torch.mul(parts[f"{name}_q"], parts[f"{name}_s"][:, None], out=w)
        else:
            int4.dequantize(parts[f"{name}_q"], parts[f"{name}_s"], parts[f"{name}_o"], w.shape[1], layout.dtype,
                            out=w)


class LowPrecisionExperts:
    """The quantized host copy of every expert of `layers` (see the module docstring)."""

    def __init__(self, store: ExpertStore, layers: list[int], precision: str, group_size: int,
                 device: torch.device, host_memory_gib: float | None = None):
        layout = self.layout = store.layout
        self.precision, self.group_size = precision, group_size
        self.regions = regions(layout, precision, group_size)
        self.bytes_per_expert = bytes_per_expert(layout, precision, group_size)
        stride = -(-self.bytes_per_expert // ALIGN_BYTES) * ALIGN_BYTES
        self.layers = set(layers)
        self.keys = [(layer, e) for layer in layers for e in range(layout.num_experts)]
        need = store.nbytes + len(self.keys) * stride + PROCESS_ALLOWANCE_BYTES + HOST_MARGIN_BYTES
        have = host_bytes_available(host_memory_gib)
        log.info("lossy misses: %.1f GiB host copy; before allocating it: process RSS %.1f GiB, MemAvailable %.1f GiB,"
                 " host %.1f GiB", len(self.keys) * stride / 2**30,
                 (_meminfo_bytes("VmRSS", Path("/proc/self/status")) or 0) / 2**30,
                 (_meminfo_bytes("MemAvailable") or 0) / 2**30, (have or 0) / 2**30)
        if have is not None and need > have:
            raise HostMemoryError(f"lossy misses ({precision}) need {need / 2**30:.1f} GiB of host memory: the store, its"
                                  f" low-precision copy of {len(self.keys)} experts and {HOST_MARGIN_BYTES / 2**30:.0f}"
                                  f" GiB for the rest of the process; this machine has {have / 2**30:.1f} GiB (use"
                                  " lossy_misses=int4, or set hardware.host_memory_gib if that is wrong)")
        self._slab = torch.zeros(len(self.keys) * stride, dtype=torch.uint8)  # [K x stride], touched before pinning
        self._index = {key: i * stride for i, key in enumerate(self.keys)}
        self.pinned = device.type == "cuda"
        if self.pinned and self.keys:
            _register(self._slab)
        try:
            for key in self.keys:
                self._quantize(store.flat(key), self.flat(key), device)
        except BaseException:
            self.close()
            raise

    @property
    def nbytes(self) -> int:
        return self._slab.numel()

    def flat(self, key: ExpertKey) -> torch.Tensor:
        """Expert `key`'s byte range: uint8 [bytes_per_expert]."""
        start = self._index[key]
        return self._slab[start:start + self.bytes_per_expert]

    @torch.no_grad()
    def _quantize(self, src: torch.Tensor, dst: torch.Tensor, device: torch.device) -> None:
        parts = {r.name: r.view(dst) for r in self.regions}
        for name, w_host in zip(("gate_up", "down"), self.layout.split(src)):  # [O, I] each
            rows = max(1, CHUNK_NUMEL // w_host.shape[1])
            for r0 in range(0, w_host.shape[0], rows):
                w = w_host[r0:r0 + rows].to(device)  # [rows, I]; quantization is per row, so chunks are exact
                if self.precision == "int8":
                    outs = quantize_rows(w)  # int8 [rows, I], [rows]
                    names = ("q", "s")
                else:
                    outs = int4.quantize(w, self.group_size)  # [rows, I_pad / 2], [rows, G] x 2
                    names = ("q", "s", "o")
                for part, t in zip(names, outs):
                    parts[f"{name}_{part}"][r0:r0 + rows].copy_(t)

    def close(self) -> None:
        if self.pinned and self.keys:
            torch.cuda.cudart().cudaHostUnregister(self._slab.data_ptr())
        self.pinned = False
        self._slab = torch.empty(0, dtype=torch.uint8)


@dataclass
class LossyStats:
    num_lossy_loads: int = 0  # demand loads that moved a low-precision copy
    lossy_load_bytes: int = 0
    num_lossy_computes: int = 0  # expert computations served from a lossy slot (its load + later hits)


class LossyMissTransfer:
    """The provider's transfer engine, with demand loads of lossy layers made low-precision.

    Every other call goes to the wrapped engine. The provider's main thread alone issues demand
    loads, so the one staging buffer is used by one thread, and the demand stream orders it."""

    def __init__(self, inner: TransferEngine, store: ExpertStore, lowp: LowPrecisionExperts, device: torch.device):
        self.inner, self.lowp, self.stats = inner, lowp, LossyStats()
        self._key_of_src = {store.flat(key).data_ptr(): key for key in lowp.keys}
        self._staging = torch.empty(lowp.bytes_per_expert if lowp.keys else 0, dtype=torch.uint8, device=device)
        self.lossy_slots: set[int] = set()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def load(self, slot: int, dst: torch.Tensor, src: torch.Tensor, prefetch: bool = False, finish=None) -> None:
        key = None if prefetch or finish is not None else self._key_of_src.get(src.data_ptr())
        if key is None:
            self.lossy_slots.discard(slot)
            self.inner.load(slot, dst, src, prefetch, finish)
            return
        lowp, staging = self.lowp, self._staging

        def dequantize() -> None:
            dequantize_into(staging, dst, lowp.layout, lowp.precision, lowp.group_size, lowp.regions)

        self.inner.load(slot, staging, lowp.flat(key), finish=dequantize)
        self.lossy_slots.add(slot)
        self.stats.num_lossy_loads += 1
        self.stats.lossy_load_bytes += lowp.bytes_per_expert

    def copy_fraction(self, layer: int) -> float:
        """The fraction of an expert's bytes a demand copy at `layer` moves (for host-compute cost models)."""
        return self.lowp.bytes_per_expert / self.lowp.layout.expert_bytes if layer in self.lowp.layers else 1.0

    def wait_ready(self, slot: int) -> None:
        """The provider waits once for every expert it serves: a lossy slot's wait is a lossy computation."""
        if slot in self.lossy_slots:
            self.stats.num_lossy_computes += 1
        self.inner.wait_ready(slot)

    def close(self) -> None:
        if self.inner.cuda:  # no copy may still read the pages being unregistered
            torch.cuda.synchronize(self.inner.device)
        self._staging = None
        self.lowp.close()


def install_lossy_misses(provider, store: ExpertStore, layers: list[int], precision: str, group_size: int,
                         device: torch.device, host_memory_gib: float | None = None) -> LossyMissTransfer:
    """Quantize `layers`' experts and make the provider's demand loads at those layers lossy."""
    lowp = LowPrecisionExperts(store, layers, precision, group_size, device, host_memory_gib)
    transfer = LossyMissTransfer(provider.transfer, store, lowp, device)
    provider.transfer = transfer
    log.info("lossy misses: %s copies of %d experts (layers %s..), %d bytes each (%.2f of the dtype's), %.2f GiB host",
             precision, len(lowp.keys), layers[0] if layers else None, lowp.bytes_per_expert,
             lowp.bytes_per_expert / store.layout.expert_bytes, lowp.nbytes / 2**30)
    return transfer


def lossy_reason(precision: str, group_size: int, cutoff: int, num_computes: int) -> str:
    """The summary's reason for lossless=false, given for runs where a lossy copy was used at all."""
    detail = "int8 with one scale per output row" if precision == "int8" else (
        f"int4 with a scale and offset per {group_size} input columns")
    return (f"lossy by design: method.plus.lossy_misses={precision}: demand misses past the cutoff (MoE layer"
            f" index > {cutoff}) load a weight-only quantized copy ({detail}), and later hits reuse it"
            f" ({num_computes} expert computations used such a copy)")
