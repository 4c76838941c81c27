"""
HookOwner: a component that installs torch module hooks (predictors, routing replay and recording,
adaptive gating) keeps their handles in `self._handles`; `remove()` detaches every one of them.

Invariant: after `remove()` the owner has no hook left on any module, and a second call is a no-op.
"""

from __future__ import annotations


class HookOwner:
    _handles: list

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
