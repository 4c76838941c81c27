"""
Transfer engine: host->device expert copies into cache slots, and their ordering.

On CUDA, copies run on dedicated copy streams: `demand` (on-demand misses, high priority) and
`prefetch` (speculative loads, issued by the prefetch worker thread). Per slot there are two
events:
- `ready[s]`, recorded on the copy stream after the copy into slot s; the compute stream
  waits on it (`wait_ready`) before reading the slot. Never a device-wide synchronize.
- `free[s]`, recorded on the compute stream after the last kernel that reads slot s
  (`release`); the copy stream waits on it before overwriting the slot, so a slot is never
  overwritten while a kernel may still read it. `release_many` records one event after the last
  kernel that reads any of its slots (a layer's grouped matmul) and makes it every one of those
  slots' `free` event: one record per layer instead of one per slot; a later `release` of one of
  them records that slot's own event, so the others keep waiting on the shared one only.
Timing uses extra events, harvested only once they have completed: copy time (for achieved
bandwidth) and *stall* time (the compute stream blocked on an in-flight copy).
On CPU, copies are synchronous; the whole copy is stall.
With `pace_gb_per_s`, every copy is stretched to bytes / that bandwidth and all copies share one
emulated link (`spmoe.offload.pacing`); copy and stall times then include the padding.

A `load` may carry `finish`, work that turns the copied bytes into the slot's weights (e.g.
dequantizing a low-precision copy staged in another buffer): it runs on the same copy stream after
the copy and before the slot's ready event (on CPU, right after the copy), so `wait_ready` covers it.

`load` marks its slot not landed before issuing the copy, and callers issue it before the slot's new
key can be looked up (the cache's admission and the load happen under one lock where two threads
load), so a slot marked landed always holds its current key's weights.

Invariant: every `load` is followed by `wait_ready` before the slot is read, and every read
is followed by `release` before the slot can be reloaded. `load` and `collect` may be called
from two threads (main and prefetch worker); the stats are guarded by a lock.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from spmoe.offload.pacing import Pacer
from spmoe.runtime.streams import dedicated_stream, on_stream


@dataclass
class TransferStats:
    h2d_bytes: int = 0
    copy_ms: float = 0.0  # time the copy engine spent copying
    stall_ms: float = 0.0  # time compute waited for copies

    def add(self, other: TransferStats) -> None:
        self.h2d_bytes += other.h2d_bytes
        self.copy_ms += other.copy_ms
        self.stall_ms += other.stall_ms


class TransferEngine:
    def __init__(self, device: torch.device, num_slots: int, pace_gb_per_s: float | None = None):
        self.device = device
        self.pacer = Pacer(device, pace_gb_per_s) if pace_gb_per_s else None
        self._issue_lock = self.pacer.lock if self.pacer else nullcontext()  # pacing: one FIFO link
        self.cuda = device.type == "cuda"
        self._pending = TransferStats()
        self._copy_spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._lock = threading.Lock()
        if self.cuda:
            self._index = device.index if device.index is not None else torch.cuda.current_device()
            self.copy_stream = dedicated_stream(device, "copy")  # on-demand: highest priority
            self.prefetch_stream = dedicated_stream(device, "prefetch")
            self.ready = [torch.cuda.Event() for _ in range(num_slots)]
            self._own_free = [torch.cuda.Event() for _ in range(num_slots)]
            self.free = list(self._own_free)  # slot -> the event its next copy waits on
            self._freed = [False] * num_slots
            self._landed = [False] * num_slots  # ready[s] seen complete since slot s's last load

    def load(self, slot: int, dst: torch.Tensor, src: torch.Tensor, prefetch: bool = False,
             finish: Callable[[], None] | None = None) -> None:
        """Copy `src` (host) into `dst` (slot `slot`'s buffer, or a staging buffer that `finish`
        turns into the slot's weights), ordered after the slot's last reader.

        On CPU the copy is synchronous; it counts as stall only when it is not a prefetch. Copy and
        stall times exclude `finish`."""
        nbytes = src.numel() * src.element_size()
        if not self.cuda:
            t0 = time.perf_counter()
            dst.copy_(src)
            if self.pacer:
                self.pacer.pad_host(nbytes, (time.perf_counter() - t0) * 1e3)
            ms = (time.perf_counter() - t0) * 1e3
            with self._lock:
                self._pending.h2d_bytes += nbytes
                self._pending.copy_ms += ms
                self._pending.stall_ms += 0.0 if prefetch else ms
            if finish is not None:
                finish()
            return
        stream = self.prefetch_stream if prefetch else self.copy_stream
        self._landed[slot] = False
        with on_stream(stream), self._issue_lock:
            if self._freed[slot]:
                stream.wait_event(self.free[slot])
            if self.pacer:
                self.pacer.wait(stream)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            if self.pacer:
                self.pacer.pad(nbytes)  # the slot is "ready" when the emulated link would deliver it
            end.record(stream)
            if finish is not None:
                finish()
            self.ready[slot].record(stream)
            if self.pacer:
                self.pacer.mark(end)
        with self._lock:
            self._pending.h2d_bytes += nbytes
            self._copy_spans.append((start, end))

    def is_ready(self, slot: int) -> bool:
        return not self.cuda or self.ready[slot].query()

    def sync_prefetch(self) -> None:
        """Block until every issued prefetch copy has landed (the unbatched-I/O ablation)."""
        if self.cuda:
            self.prefetch_stream.synchronize()

    def wait_ready(self, slot: int) -> None:
        """Make the current (compute) stream wait until slot `slot`'s copy has landed (a slot seen landed
        since its last load is not queried again)."""
        if not self.cuda or self._landed[slot]:
            return
        if self.ready[slot].query():
            self._landed[slot] = True
            return
        stream = torch.cuda.current_stream(self._index)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        stream.wait_event(self.ready[slot])
        end.record(stream)
        with self._lock:
            self._stall_spans.append((start, end))

    def release(self, slot: int) -> None:
        """The compute stream has enqueued its last read of slot `slot`."""
        if self.cuda:
            event = self._own_free[slot]
            event.record(torch.cuda.current_stream(self._index))
            self.free[slot] = event
            self._freed[slot] = True

    def release_many(self, slots: list[int]) -> None:
        """The compute stream has enqueued its last read of every slot in `slots`: one shared free event."""
        if self.cuda and slots:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._index))
            for slot in slots:
                self.free[slot] = event
                self._freed[slot] = True

    def collect(self) -> TransferStats:
        """Stats since the last collect; spans whose events have not completed stay pending."""
        with self._lock:
            if self.cuda:
                self._pending.copy_ms += _harvest(self._copy_spans)
                self._pending.stall_ms += _harvest(self._stall_spans)
            out, self._pending = self._pending, TransferStats()
        return out


def _harvest(spans: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float:
    total_ms, keep = 0.0, []
    for start, end in spans:
        if end.query():
            total_ms += start.elapsed_time(end)
        else:
            keep.append((start, end))
    spans[:] = keep
    return total_ms
