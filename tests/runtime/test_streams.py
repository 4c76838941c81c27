"""Dedicated streams: one per (device, role), never the same CUDA stream for two roles, although the
pool they are drawn from hands out the same streams round-robin."""

from __future__ import annotations

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
