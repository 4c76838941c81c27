"""
ExpertStore: every routed expert of the target model in host memory.

One slab per MoE layer holds that layer's experts back to back; each expert is one contiguous
flat buffer of `layout.expert_numel` elements inside it (so loading an expert is one copy).
On a CUDA machine the slabs are page-locked with `cudaHostRegister` on ordinary allocations:
PyTorch's pinned caching allocator rounds every block up to a power of two (a 352 MB Mixtral
expert would take 512 MB), so the store is sized exactly and registered instead.

Invariants: the store is allocated once, at its exact size; buffers never move; the store is
filled before the first forward and read-only afterwards.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from spmoe.models.experts import ExpertLayout
from spmoe.types import ExpertKey

log = logging.getLogger(__name__)


class ExpertStore:
    def __init__(self, layout: ExpertLayout, pin: bool):
        self.layout = layout
        self.pinned = False
        self._slabs: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        for layer in layout.moe_layers:
            slab = torch.empty(layout.num_experts * layout.expert_numel, dtype=layout.dtype)
            self._slabs[layer] = slab
            if pin:
                slab.zero_()  # touch first: registering faulted-in pages is several times faster
                _register(slab)
        self.pinned = pin
        log.info("expert store: %d experts, %.2f GiB host memory, pinned=%s, %.1f s",
                 len(layout.keys), self.nbytes / 2**30, pin, time.perf_counter() - t0)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._slabs.values())

    def flat(self, key: ExpertKey) -> torch.Tensor:
        layer, expert = key
        n = self.layout.expert_numel
        return self._slabs[layer][expert * n : (expert + 1) * n]

    def fill_random(self, seed: int, std: float, device: torch.device) -> None:
        """Seeded N(0, std) weights, generated on `device` (fast on a GPU) and copied into the store."""
        gen = torch.Generator(device=device).manual_seed(seed)
        for key in self.layout.keys:
            buf = torch.empty(self.layout.expert_numel, dtype=self.layout.dtype, device=device)
            buf.normal_(0.0, std, generator=gen)
            self.flat(key).copy_(buf)

    def fill(self, read: Callable[[ExpertKey, torch.Tensor, torch.Tensor], None]) -> None:
        """Fill every expert with `read(key, gate_up_out, down_out)` (e.g. a checkpoint reader)."""
        for key in self.layout.keys:
            gate_up, down = self.layout.split(self.flat(key))
            read(key, gate_up, down)

    def close(self) -> None:
        if self.pinned:
            for slab in self._slabs.values():
                torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())
            self.pinned = False
        self._slabs.clear()


def _register(t: torch.Tensor) -> None:
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {t.numel() * t.element_size()} bytes failed with error {err}")
