"""Free events on the CUDA path, checked on the CPU with stand-ins for streams and events.

A layer's `LayerSlots.release` records one shared free event (`TransferEngine.release_many`): a copy
into any of its slots must wait on an event recorded after the layer's kernels, and a later
per-slot `release` of one of them must not move the event the others wait on. The stand-ins log
the order in which work is enqueued: an event "covers" every entry before its record."""

from __future__ import annotations

import pytest
import torch

from spmoe.offload.transfer import TransferEngine
from spmoe.runtime import streams

LOG: list[str] = []


class FakeEvent:
    def __init__(self, enable_timing: bool = False):
        self.at: int | None = None  # log position of its latest record

    def record(self, stream=None) -> None:
        self.at = len(LOG)
        LOG.append("record")

    def query(self) -> bool:
        return True


class FakeStream:
    def __init__(self, name: str):
        self.name, self.waits = name, []
        self.cuda_stream, self.device_index = id(self), 0

    def wait_event(self, event: FakeEvent) -> None:
        self.waits.append(event.at)


@pytest.fixture
def engine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device, priority=0: FakeStream(f"copy{priority}"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("compute"))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: None)
    monkeypatch.setattr(streams, "_streams", {})  # the fakes stay out of the process's stream registry
    LOG.clear()
    eng = TransferEngine(torch.device("cuda", 0), 4)
    eng.device = torch.device("cpu")
    return eng


def _kernel(name: str) -> int:
    LOG.append(name)
    return len(LOG) - 1


def _load(engine: TransferEngine, slot: int) -> int:
    """The log position of the free event the copy into `slot` waited on."""
    engine.load(slot, torch.zeros(2), torch.ones(2))
    return engine.copy_stream.waits[-1]


def test_release_many_orders_every_slot_after_the_layer_kernel(engine):
    a = _kernel("grouped layer 0 reads slots 0 1 2")
    engine.release_many([0, 1, 2])
    b = _kernel("expert reads slot 1")
    engine.release(1)
    assert _load(engine, 0) > a and _load(engine, 2) > a  # after the layer's kernel
    assert _load(engine, 0) < b  # slot 1's later release did not move slot 0's event
    assert _load(engine, 1) > b  # slot 1 waits for its own later reader
    engine.load(3, torch.zeros(2), torch.ones(2))  # never released: no wait
    assert len(engine.copy_stream.waits) == 4


def test_release_many_after_release_replaces_the_slot_event(engine):
    engine.release(0)
    a = _kernel("grouped layer reads slot 0")
    engine.release_many([0])
    assert _load(engine, 0) > a
    engine.release_many([])  # nothing recorded
    assert LOG.count("record") == 2 + 3  # two free records, and the load's start, end and ready records


def test_a_landed_slot_is_not_queried_again_until_its_next_load(engine, monkeypatch):
    queries, compute = [], FakeStream("compute")
    monkeypatch.setattr(FakeEvent, "query", lambda self: queries.append(self) or len(queries) > 1)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    engine.load(2, torch.zeros(2), torch.ones(2))
    engine.wait_ready(2)  # in flight: the compute stream waits on its ready event
    assert len(queries) == 1 and compute.waits == [engine.ready[2].at]
    engine.wait_ready(2)  # landed now: seen once,
    engine.wait_ready(2)  # then not queried again
    assert len(queries) == 2
    engine.load(2, torch.zeros(2), torch.ones(2))  # a new copy: queried again
    engine.wait_ready(2)
    assert len(queries) == 3
