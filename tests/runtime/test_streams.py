"""Dedicated streams: one per (device, role), never the same CUDA stream for two roles, although the
pool they are drawn from hands out the same streams round-robin."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

from spmoe.runtime import streams


class FakeStream:
    def __init__(self, handle: int, priority: int):
        self.cuda_stream, self.priority = handle, priority


def round_robin_pool(size: int):
    """A pool like PyTorch's: the n-th stream of a priority is handle n mod size of that priority's pool."""
    drawn = {}

    def new_stream(device, priority=0):
        n = drawn[priority] = drawn.get(priority, -1) + 1
        return FakeStream(1000 * (priority + 2) + n % size, priority)

    return new_stream


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch):
    monkeypatch.setattr(streams, "_streams", {})


def test_roles_get_distinct_streams_from_a_pool_that_repeats():
    pool = round_robin_pool(size=2)
    dev = torch.device("cuda", 0)
    prefetch = streams.dedicated_stream(dev, "prefetch", pool)
    for _ in range(3):  # other code draws from the pool meanwhile, so it wraps around
        pool(dev)
    capture = streams.dedicated_stream(dev, "capture", pool)
    predict = streams.dedicated_stream(dev, "predict", round_robin_pool(size=3))
    copy = streams.dedicated_stream(dev, "copy", pool)
    handles = [s.cuda_stream for s in (prefetch, capture, predict, copy)]
    assert len(set(handles)) == 4
    assert copy.priority == -1 and prefetch.priority == 0
    assert streams.dedicated_stream(dev, "capture", pool) is capture  # one stream per role


def test_devices_are_separate_and_errors_are_clear():
    pool = round_robin_pool(size=1)
    a = streams.dedicated_stream(torch.device("cuda", 0), "capture", pool)
    b = streams.dedicated_stream(torch.device("cuda", 1), "capture", pool)
    assert a is not b
    with pytest.raises(RuntimeError, match="distinct"):  # a one-stream pool cannot serve two roles
        streams.dedicated_stream(torch.device("cuda", 0), "prefetch", pool)
    with pytest.raises(ValueError, match="valid: .*capture"):
        streams.dedicated_stream(torch.device("cuda", 0), "compute", pool)


def test_the_library_draws_no_pool_stream_but_through_dedicated_stream():
    """Every stream the library captures on or copies on is a dedicated one: a `torch.cuda.Stream()` drawn
    anywhere else could be the prefetch worker's stream (the pool wraps around)."""
    root = Path(streams.__file__).parents[1]
    pool_draw = re.compile(r"torch\.cuda\.Stream\(|torch\.cuda\.graph\((?![^)]*stream=)")  # graph(): its own stream
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "streams.py" and pool_draw.search(p.read_text())]
    assert offenders == []


def test_captures_and_worker_copies_run_side_by_side(gpu):
    """After the pool has wrapped many times, a worker thread copying on the prefetch stream (waiting on events
    of the compute stream) while the main thread captures and replays graphs on the capture stream: no error, and
    every copy and every replay lands."""
    for _ in range(70):
        torch.cuda.Stream(gpu), torch.cuda.Stream(gpu, priority=-1)  # wrap PyTorch's pools
    capture, prefetch = streams.dedicated_stream(gpu, "capture"), streams.dedicated_stream(gpu, "prefetch")
    assert capture.cuda_stream != prefetch.cuda_stream
    src = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
    dst = torch.empty(64, 1 << 20, device=gpu)
    free = torch.cuda.Event()
    free.record()
    errors = []
    index = torch.cuda.current_device()

    def worker():
        try:
            torch.cuda.set_device(index)
            with streams.on_stream(prefetch):  # this thread's current stream only
                for i in range(64):
                    prefetch.wait_event(free)
                    dst[i].copy_(src, non_blocking=True)
            prefetch.synchronize()
        except BaseException as exc:
            errors.append(exc)

    x = torch.ones(256, device=gpu)
    outs = []
    thread = threading.Thread(target=worker)
    thread.start()
    for _ in range(64):
        graph = torch.cuda.CUDAGraph()
        capture.wait_stream(torch.cuda.current_stream(gpu))
        with torch.cuda.stream(capture):
            graph.capture_begin(capture_error_mode="thread_local")
            y = x * 2
            graph.capture_end()
        torch.cuda.current_stream(gpu).wait_stream(capture)
        graph.replay()
        outs.append(y)
    thread.join()
    torch.cuda.synchronize()
    assert errors == []
    assert all(torch.equal(y, x * 2) for y in outs)
    assert torch.equal(dst, src.to(gpu).expand(64, -1))


def test_on_stream_none_keeps_the_current_stream():
    with streams.on_stream(None) as stream:
        assert stream is None


def test_on_stream_switches_the_current_stream_and_restores_it(gpu):
    before = torch.cuda.current_stream(gpu)
    copy = streams.dedicated_stream(gpu, "copy")
    with streams.on_stream(copy):
        assert torch.cuda.current_stream(gpu) == copy
        with streams.on_stream(streams.dedicated_stream(gpu, "prefetch")):
            assert torch.cuda.current_stream(gpu) != copy
        assert torch.cuda.current_stream(gpu) == copy
    assert torch.cuda.current_stream(gpu) == before
    try:
        with streams.on_stream(copy):
            raise KeyError
    except KeyError:
        pass
    assert torch.cuda.current_stream(gpu) == before
