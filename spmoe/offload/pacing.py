"""
PCIe pacing: emulate a slower host->device link than the machine's (`hardware.pace_pcie=true`
with `hardware.pcie_gb_per_s`, e.g. an RTX 4090's PCIe Gen4 x16 on an H200's Gen5 link).

Terms: B = a copy's bytes, W = the emulated bandwidth (GB/s = 1e9 B/s). A paced copy occupies the
emulated bus for B / W; the real copy is faster, so the copy stream is padded after it with a
device-side spin (`torch.cuda._sleep`) of the difference. All paced copies, on every copy stream,
form one FIFO: each waits for the previous one's end (event), because one PCIe link is shared:
two streams must not each get W. (A prefetch queued earlier therefore delays a later on-demand
load, as one DMA engine would.) The spin's cycles per millisecond and the real pinned bandwidth are measured once per device.
On CPU the pad is a host sleep after the synchronous copy.

Invariants: pacing only adds time after a copy, never moves bytes or reorders a stream's own
copies; with pacing off nothing here runs.
"""

from __future__ import annotations

import threading
import time

import torch

_CYCLES_PER_MS: dict[int, float] = {}
_REAL_GB_PER_S: dict[int, float] = {}


def pad_ms(nbytes: int, copy_ms: float, gb_per_s: float) -> float:
    """Padding that makes a copy of `nbytes` that took `copy_ms` last nbytes / W in total."""
    return max(0.0, nbytes / (gb_per_s * 1e6) - copy_ms)


def cycles_per_ms(device: torch.device) -> float:
    """GPU spin cycles per millisecond, measured once per device with a 20M-cycle `_sleep`."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CYCLES_PER_MS:
        with torch.cuda.device(index):
            torch.cuda._sleep(1_000_000)  # warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            _CYCLES_PER_MS[index] = 20_000_000 / start.elapsed_time(end)
    return _CYCLES_PER_MS[index]


class Pacer:
    """One emulated link of `gb_per_s` shared by every copy stream of a transfer engine.

    The engine issues a paced copy as: `with pacer.lock:` wait(stream) -> copy -> pad(nbytes)
    -> record its end event -> mark(end); the lock keeps the FIFO order of the shared link
    consistent between the main thread and the prefetch worker."""

    def __init__(self, device: torch.device, gb_per_s: float):
        if gb_per_s <= 0:
            raise ValueError(f"hardware.pcie_gb_per_s must be > 0 to pace, got {gb_per_s}")
        self.device, self.gb_per_s = device, gb_per_s
        self.lock = threading.Lock()
        self._last: torch.cuda.Event | None = None  # end of the previous paced copy (any stream)
        self._real_gb_per_s: float | None = None  # the real pinned bandwidth (CUDA only)
        if device.type == "cuda":
            self._cycles_per_ms = cycles_per_ms(device)
            self._real_gb_per_s = pinned_gb_per_s(device)

    def wait(self, stream: torch.cuda.Stream) -> None:
        if self._last is not None:
            stream.wait_event(self._last)

    def pad(self, nbytes: int) -> None:
        """Spin the current (copy) stream for B / W - B / (measured link bandwidth)."""
        ms = pad_ms(nbytes, nbytes / (self._real_gb_per_s * 1e6), self.gb_per_s)
        if ms > 0:
            torch.cuda._sleep(int(ms * self._cycles_per_ms))

    def mark(self, end: torch.cuda.Event) -> None:
        self._last = end

    def link_ms(self, nbytes: int) -> float:
        """What one copy of `nbytes` occupies the emulated link: B / W (B / the real bandwidth where that is lower)."""
        return nbytes / (min(self.gb_per_s, self._real_gb_per_s or self.gb_per_s) * 1e6)

    def pad_host(self, nbytes: int, copy_ms: float) -> float:
        """CPU: sleep out the rest of the emulated copy time; returns the padding in ms."""
        ms = pad_ms(nbytes, copy_ms, self.gb_per_s)
        if ms > 0:
            time.sleep(ms / 1e3)
        return ms


def pinned_gb_per_s(device: torch.device, nbytes: int = 32 << 20) -> float:
    """The real pinned host->device bandwidth (best of 3 copies of 32 MiB), once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _REAL_GB_PER_S:
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", index))
        best_ms = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best_ms = min(best_ms, start.elapsed_time(end))
        _REAL_GB_PER_S[index] = nbytes / (best_ms * 1e6)
    return _REAL_GB_PER_S[index]
