"""
HookOwner: a component that installs torch module hooks (predictors, routing replay and recording,
adaptive gating) keeps their handles in `self._handles`; `remove()` detaches every one of them.

Invariant: after `remove()` the owner has no hook left on any module, and a second call is a no-op.

While a CUDA graph is being built (its warm-up forwards and its capture: `building()`), a graph-safe hook
that also does host work on a live forward (a predictor's submissions) keeps to its device work, which
the graph then replays; the host side runs after each replay instead (`is_building`).

A hook marked with `mark_graph_safe` (a torch module hook, or an experts module's seam hook,
`spmoe.models.experts.on_experts_call`) promises that everything it does is device work on tensors
whose addresses do not change between calls (its host code only picks views), so a CUDA graph that
captured the forward replays its effect; `spmoe.runtime.graphs.graph_safe` accepts such hooks and
refuses every other.
"""

from __future__ import annotations

from contextlib import contextmanager


class HookOwner:
    _handles: list

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


GRAPH_SAFE = "_spmoe_graph_safe"


def mark_graph_safe(hook):
    """`hook`, marked as replayable by a CUDA graph (see the module docstring)."""
    setattr(hook, GRAPH_SAFE, True)
    return hook


def is_graph_safe(hook) -> bool:
    return getattr(hook, GRAPH_SAFE, False)


_BUILDING = [0]  # graphs being built (warm-ups and captures run on the main thread only)


@contextmanager
def building():
    """Mark the forwards run inside as a graph's warm-up or capture (see the module docstring)."""
    _BUILDING[0] += 1
    try:
        yield
    finally:
        _BUILDING[0] -= 1


def is_building() -> bool:
    return _BUILDING[0] > 0
