"""
Dedicated CUDA streams: one stream per (device, role), pairwise distinct across roles.

Why: `torch.cuda.Stream()` hands out streams round-robin from a small per-priority pool (32 per
device in PyTorch), so two streams created apart in time can be the same CUDA stream. When one of
them is a capture stream and the other the prefetch worker's copy stream, the worker's copies join
the main thread's CUDA graph capture: the capture breaks ("dependency created on uncaptured work")
or records the copy into the graph, and a later call fails with an invalid argument.

Roles: `copy` (on-demand expert loads, high priority), `prefetch` (the prefetch worker's loads),
`capture` (every CUDA graph capture and its warm-up: whole-step graphs, piecewise segments, call-site
expert graphs), `predict` (the draft-side router's side stream). Any other stream drawn from the pool
(PyTorch's, a library's) may still coincide with one of these; it is never captured on by this project.

Invariant: `dedicated_stream(device, role)` returns the same stream for the same role, and streams of
different roles of one device are different CUDA streams (drawn again from the pool while they collide).
The `capture` stream carries captures and the capture passes' own segments and experts only: host work
that hands pinned buffers to other threads (predictors' seam hooks) runs on the ambient stream
(`spmoe.runtime.piecewise` says why).

`on_stream(stream)` makes a stream current for a block like `torch.cuda.stream` (None: no switch), without resolving the
current device (which `torch.cuda.stream` and an argument-less `Event.record()` do through
`torch.cuda.is_available()` on every call): hot paths use it and record events on explicit streams.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

ROLES = {"copy": -1, "prefetch": 0, "capture": 0, "predict": 0}  # role -> stream priority (lower = higher)
MAX_DRAWS = 256

_streams: dict[tuple[int | None, str], object] = {}


def dedicated_stream(device: torch.device, role: str, new_stream: Callable | None = None):
    """The role's stream on `device` (see the module docstring); `new_stream(device, priority=p)` draws one
    from the pool (default `torch.cuda.Stream`)."""
    if role not in ROLES:
        raise ValueError(f"unknown stream role {role!r}; valid: {sorted(ROLES)}")
    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    key = (index, role)
    stream = _streams.get(key)
    if stream is not None:
        return stream
    new_stream = new_stream or torch.cuda.Stream
    taken = {s.cuda_stream for (i, _), s in _streams.items() if i == index}
    for _ in range(MAX_DRAWS):
        stream = new_stream(device, priority=ROLES[role])
        if stream.cuda_stream not in taken:
            _streams[key] = stream
            return stream
    raise RuntimeError(f"no CUDA stream for role {role!r} distinct from {len(taken)} others after {MAX_DRAWS} draws")


def capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph (never off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def on_stream(stream):
    """`with on_stream(stream):` the block's work is enqueued on `stream` (made current on its device, for this
    thread; the previous current stream is restored on exit). None: the current stream stays."""
    return nullcontext() if stream is None else _StreamSwitch(stream)


class _StreamSwitch:
    __slots__ = ("stream", "previous")

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.previous = torch.cuda.current_stream(self.stream.device_index)
        torch.cuda.set_stream(self.stream)
        return self.stream

    def __exit__(self, *exc) -> None:
        torch.cuda.set_stream(self.previous)
