"""
PrefetchProvider: an ExpertProvider that also takes speculative prefetch requests.

A *request* (step s, layer l, predicted experts) comes from a predictor while the draft runs.
A background worker thread (or the main thread inline, `worker_thread=False`) serves requests
in priority order, earlier steps and earlier layers first (arrival order among equals; inline
serving is in arrival order): it admits each predicted expert
into the cache (no miss counted), issues its copy on the prefetch copy stream (a layer's experts
back to back = batched I/O; `batched_io=False` waits for each copy before the next), and
*protects* it (a pin) until verification of step s reaches layer l (then the needed experts
hold their own pin while computed and mispredicted ones become evictable). Experts already resident
are protected without a copy.

Dropped requests (counted): those whose layer verification has already reached, experts for
which no unprotected, unpinned slot is left, and, with a policy that estimates next uses
(`expected_reuse`), experts whose victim is expected to be needed before them
(`ExpertCache.would_evict_sooner_needed`).

Verification at layer l classifies each needed expert: *prefetch hit* (brought by a prefetch,
copy landed), *late prefetch* (brought by a prefetch, copy in flight: the compute stream waits
on its event, counted as stall), *hit* (resident otherwise), *miss* (loaded on demand on the
high-priority stream). A *wasted* prefetch is one evicted, or left at the end, never used.

Failure behaviour: an exception in the worker is re-raised on the main thread at its next call;
every wait of the main thread (on the worker, or inline on a prediction) is bounded by `timeout_s`
and becomes a TimeoutError; the worker itself blocks GIL-free on predictions, and a worker stuck
on a dead device surfaces as that timeout.
A cache that started full (`spmoe.offload.assemble`) is served through `serve_resident`, without a host sync.
Invariants: all cache bookkeeping happens under `self.lock`; protections of a step are all
released by `end_step`, so no slot stays pinned across steps.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from spmoe.offload.cache import ExpertCache
from spmoe.offload.layer_slots import LayerSlots
from spmoe.offload.provider import serve_in_order, serve_layer, slot_tables
from spmoe.offload.store import ExpertStore
from spmoe.offload.transfer import TransferEngine
from spmoe.runtime.resident import ResidentTable
from spmoe.trace.records import ExpertEventLog
from spmoe.types import ExpertKey

log = logging.getLogger(__name__)


class _LockedResidentTable(ResidentTable):
    """A `ResidentTable` whose cache reads hold the provider's lock (the worker thread admits concurrently)."""

    def __init__(self, cache: ExpertCache, layout, lock: threading.RLock):
        super().__init__(cache, layout)
        self.lock = lock

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._possible:  # a cache smaller than the model: no lock taken on every layer call
            return None
        with self.lock:
            return super().get(layer)


@dataclass
class PrefetchRequest:
    step: int
    layer: int
    position: int  # verify position of the first row (draft token index; target-side predictors: 0)
    expert_ids: torch.Tensor  # [P, A] host tensor, one row per verify position, most probable first;
    #                           valid once `ready` completed
    ready: torch.cuda.Event | None = None  # recorded after the device->host copy of the ids

    @classmethod
    def from_ids(cls, step: int, layer: int, position: int, ids: torch.Tensor) -> PrefetchRequest:
        """A request for predicted ids [P, A] still on the device: an asynchronous copy into pinned
        host memory plus an event, so the predicting stream never waits for the prefetch side."""
        if not ids.is_cuda:
            return cls(step, layer, position, ids.clone())
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(ids.device.index))
        return cls(step, layer, position, host, ready)


class PrefetchProvider:
    def __init__(self, cache: ExpertCache, store: ExpertStore, transfer: TransferEngine, events: ExpertEventLog,
                 worker_thread: bool = True, batched_io: bool = True, timeout_s: float = 60.0):
        self.cache, self.store, self.transfer, self.events = cache, store, transfer, events
        self.tables = slot_tables(cache, store.layout.num_experts)
        self.batched_io = batched_io
        self.timeout_s = timeout_s
        self.lock = threading.RLock()
        self.resident = _LockedResidentTable(cache, store.layout, self.lock)
        self.step = -1
        self.verify_layer = -1  # deepest layer verification of `self.step` has reached
        self._protected: dict[tuple[int, int], list[int]] = defaultdict(list)  # (step, layer) -> pinned slots
        self._by_prefetch: dict[ExpertKey, int] = {}  # key -> step whose prefetch brought it (until used/evicted)
        self._predicted: dict[tuple[int, int], dict[int, list[int]]] = defaultdict(dict)  # (step, layer) -> pos -> ids
        self.num_prefetched = self.num_dropped = self.num_wasted = 0
        self._error: BaseException | None = None
        self._queue: queue.PriorityQueue | None = None  # (step, layer, seq, request); request None = stop
        self._seq = itertools.count()
        self._worker: threading.Thread | None = None
        self._busy = threading.Event()
        if worker_thread:
            self._queue = queue.PriorityQueue()
            self._worker = threading.Thread(target=self._run_worker, name="spmoe-prefetch", daemon=True)
            self._worker.start()

    # -- requests (predictor side) ---------------------------------------------------------------

    def submit(self, request: PrefetchRequest) -> None:
        self._raise_worker_error()
        if self._queue is None:
            self._serve(request)
        else:
            self._busy.set()
            self._queue.put((request.step, request.layer, next(self._seq), request))

    def _run_worker(self) -> None:
        try:
            if self.transfer.cuda:
                device = self.transfer.device
                torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())
        except BaseException as exc:
            self._error = exc
        while True:
            request = self._queue.get()[-1]
            if request is None:
                return
            try:
                if self._error is None:
                    self._serve(request)
                else:
                    self.num_dropped += 1
            except BaseException as exc:  # surfaced on the main thread
                log.exception("prefetch worker failed")
                self._error = exc
            finally:
                if self._queue.empty():
                    self._busy.clear()

    def _wait_event(self, event: torch.cuda.Event | None) -> None:
        """Wait for a prediction's device->host copy. The worker blocks in `synchronize`, which
        releases the GIL: a polling loop would wake every few microseconds and take the GIL from
        the decode thread at each of its torch calls (on DeepSeek-V2-Lite the worker cost 40% of
        TPOT while it polled, -3% to +29% since). Its bound is the main thread's: `wait_idle`
        times out on a stuck worker."""
        if event is not None and threading.current_thread() is self._worker:
            event.synchronize()
            return
        deadline = time.monotonic() + self.timeout_s
        while event is not None and not event.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"prediction not ready after {self.timeout_s} s (stuck device?)")
            time.sleep(20e-6)

    def _serve(self, req: PrefetchRequest) -> None:
        self._wait_event(req.ready)
        rows = req.expert_ids.reshape(-1, req.expert_ids.shape[-1]).tolist()  # [P, A]
        ids = list(dict.fromkeys(e for rank in zip(*rows) for e in rank))  # union, all top-1s first
        with self.lock:
            for i, row in enumerate(rows):
                self._predicted[(req.step, req.layer)][req.position + i] = row
            if req.step != self.step or req.layer <= self.verify_layer:
                self.num_dropped += len(ids)  # verification is past this layer: it can no longer land in time
                return
            for e in ids:
                key = (req.layer, e)
                slot = self.cache.slot_of(key)
                if slot is not None:
                    if key not in self._by_prefetch or self._by_prefetch[key] != req.step:
                        self.cache.pin(slot)  # resident: protect it from eviction until its layer passes
                        self._protected[(req.step, req.layer)].append(slot)
                        self._by_prefetch.setdefault(key, -1)  # -1: protected, not brought by a copy
                    continue
                if not self.cache.can_admit(key) or self.cache.would_evict_sooner_needed(key):
                    self.num_dropped += 1
                    continue
                slot, evicted = self.cache.admit(key, count_miss=False)
                self._on_evict(evicted)
                self.cache.pin(slot)
                self._protected[(req.step, req.layer)].append(slot)
                self._by_prefetch[key] = req.step
                self.transfer.load(slot, self.cache.slot(slot), self.store.flat(key), prefetch=True)
                self.num_prefetched += 1
                if not self.batched_io:
                    self.transfer.sync_prefetch()

    def fill(self, layer: int, expert_ids: list[int]) -> int:
        """Load those of the layer's experts that are not resident into free slots, evicting nothing and
        pinning nothing (on the prefetch stream, after everything queued there): experts served some
        other way now (computed on the host) become hits later while the cache has room. Returns the
        number of loads issued."""
        issued = 0
        with self.lock:
            for e in expert_ids:
                key = (layer, e)
                if self.cache.slot_of(key) is not None or not self.cache.has_free_slot(key):
                    continue
                slot, _ = self.cache.admit(key, count_miss=False)
                self.transfer.load(slot, self.cache.slot(slot), self.store.flat(key), prefetch=True)
                issued += 1
        return issued

    def _on_evict(self, evicted: ExpertKey | None) -> None:
        if evicted is not None and self._by_prefetch.pop(evicted, -1) >= 0:
            self.num_wasted += 1

    def _unpin(self, slot: int) -> None:
        with self.lock:
            self.cache.unpin(slot)

    def _unprotect_deepest(self, layer: int) -> bool:
        """Give up the protection of one expert prefetched for the deepest later layer of this step."""
        later = [k for k, slots in self._protected.items() if k[0] == self.step and k[1] > layer and slots]
        if not later:
            return False
        self.cache.unpin(self._protected[max(later)].pop())
        return True

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"prefetch worker failed: {self._error!r}") from self._error

    # -- steps (engine side) ---------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self._raise_worker_error()
        with self.lock:
            self.step, self.verify_layer = step, -1

    def wait_idle(self) -> None:
        """Block (bounded) until the worker has served every submitted request."""
        deadline = time.monotonic() + self.timeout_s
        while self._queue is not None and self._busy.is_set():
            self._raise_worker_error()
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefetch worker still busy after {self.timeout_s} s")
            time.sleep(50e-6)
        self._raise_worker_error()

    def end_step(self) -> None:
        """Verification is over: release every protection of this step."""
        self.wait_idle()
        with self.lock:
            self.verify_layer = 1 << 30
            for key in [k for k, (s) in self._protected.items() if k[0] <= self.step]:
                for slot in self._protected.pop(key):
                    self.cache.unpin(slot)
            for key in [k for k in self._predicted if k[0] < self.step]:
                del self._predicted[key]
            for key in [k for k, s in self._by_prefetch.items() if s == -1]:
                del self._by_prefetch[key]

    def close(self) -> None:
        if self._worker is not None:
            self._queue.put((1 << 62, 0, next(self._seq), None))  # after everything still queued
            self._worker.join(timeout=self.timeout_s)
        with self.lock:
            self.num_wasted += sum(1 for s in self._by_prefetch.values() if s >= 0)
            self._by_prefetch.clear()

    def num_in_flight(self) -> int:
        """Prefetch copies of the current step issued and not landed yet (the copy queue ahead of a
        demand load, for host-compute cost models)."""
        with self.lock:
            slots = [self.cache.slot_of(k) for k, s in self._by_prefetch.items() if s == self.step]
        return sum(1 for s in slots if s is not None and not self.transfer.is_ready(s))

    def take_counts(self) -> tuple[int, int, int]:
        """(prefetched, dropped, wasted) since the last call."""
        with self.lock:
            out = (self.num_prefetched, self.num_dropped, self.num_wasted)
            self.num_prefetched = self.num_dropped = self.num_wasted = 0
        return out

    # -- verification (the ExpertProvider seam) --------------------------------------------------

    def serve_resident(self, layer: int, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """When the cache holds every expert for good (it started full): the layer's slot table, as
        `OnDemandProvider.serve_resident` (predictions then have nothing to load). Else None."""
        table = self.resident.get(layer)
        if table is not None:
            self.events.record_routes(layer, top_k_index, self.store.layout.num_experts)
        return table

    def experts_for(self, layer: int, expert_ids: list[int], token_experts: torch.Tensor | None = None,
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        ready, pending, issue = self._open(layer, expert_ids, token_experts)
        yield from serve_in_order(ready, issue, self.cache, self.transfer, self._unpin, pending)

    def serve_layer(self, layer: int, expert_ids: list[int], token_experts: torch.Tensor | None = None,
                    ) -> LayerSlots | Iterator[tuple[int, torch.Tensor]]:
        """The layer's experts all pinned (`LayerSlots`), or the `experts_for` iterator when the misses
        outnumber the slots that can be freed at once (see `spmoe.offload.provider.serve_layer`)."""
        ready, pending, issue = self._open(layer, expert_ids, token_experts)
        return serve_layer(ready, pending, issue, self.cache, self.transfer, self._unpin, self.store.layout.num_experts,
                           layer, self.tables)

    def _open(self, layer: int, expert_ids: list[int], token_experts: torch.Tensor | None,
              ) -> tuple[deque[tuple[int, int]], deque[int], Callable[[], None]]:
        """Classify and pin the needed experts, end the layer's protections, record its events:
        (ready (expert, slot), pending misses, issue)."""
        self._raise_worker_error()
        cache, transfer = self.cache, self.transfer
        ready: deque[tuple[int, int]] = deque()
        pending: deque[int] = deque()
        hits, pf_hits, late, misses = [], [], [], []
        with self.lock:
            self.verify_layer = layer
            predicted = dict(self._predicted.get((self.step, layer), {}))  # a copy: the worker may add late rows
            for e in expert_ids:
                key = (layer, e)
                slot = cache.lookup(key)
                if slot is None:
                    pending.append(e)
                    misses.append(e)
                    continue
                cache.pin(slot)
                ready.append((e, slot))
                if self._by_prefetch.pop(key, None) == self.step:
                    (pf_hits if transfer.is_ready(slot) else late).append(e)
                else:
                    hits.append(e)
            for slot in self._protected.pop((self.step, layer), []):
                cache.unpin(slot)  # needed experts hold their own pin now; mispredicted ones become evictable
        top1_correct = top1_total = 0
        if token_experts is not None and predicted:
            for pos, ids in predicted.items():
                if pos < token_experts.shape[0]:
                    top1_total += 1
                    top1_correct += int(ids[0] == int(token_experts[pos, 0]))
        union = sorted({e for ids in predicted.values() for e in ids}) if predicted else None
        self.events.record(layer, list(expert_ids), hits, misses, prefetch_hits=pf_hits, late=late,
                           predicted=union, top1_correct=top1_correct, top1_total=top1_total)

        def issue() -> None:
            with self.lock:
                while pending:
                    if not cache.can_admit((layer, pending[0])):
                        if ready or not self._unprotect_deepest(layer):
                            break  # a slot frees up when the consumer releases one
                        continue
                    e = pending.popleft()
                    slot, evicted = cache.admit((layer, e))
                    self._on_evict(evicted)
                    cache.pin(slot)
                    transfer.load(slot, cache.slot(slot), self.store.flat((layer, e)))
                    ready.append((e, slot))

        return ready, pending, issue
