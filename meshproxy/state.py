"""The live snapshot, swapped in one step.

Theory of operation: a request reads ``state.snapshot`` exactly once and uses that object for
its whole life, so a concurrent swap never shows it half of two configs. ``apply`` replaces the
reference atomically (one attribute store on the event loop thread); a rejected config never
reaches ``apply``, so the last good snapshot stays live. Listeners registered with
``subscribe`` are called after each swap (e.g. to prune upstream pools of removed clusters).
"""

from __future__ import annotations

from collections.abc import Callable

from meshproxy.config.model import EMPTY_SNAPSHOT, Snapshot


class State:
    __slots__ = ("_listeners", "applied", "last_error", "snapshot")

    def __init__(self) -> None:
        self.snapshot: Snapshot = EMPTY_SNAPSHOT
        self.applied: bool = False  # becomes True with the first applied config (/ready)
        self.last_error: str | None = None  # the last rejected config's error, for admin
        self._listeners: list[Callable[[Snapshot, Snapshot], None]] = []

    def apply(self, snapshot: Snapshot) -> None:
        old = self.snapshot
        self.snapshot = snapshot
        self.applied = True
        self.last_error = None
        for fn in self._listeners:
            fn(old, snapshot)

    def reject(self, error: str) -> None:
        self.last_error = error

    def subscribe(self, fn: Callable[[Snapshot, Snapshot], None]) -> None:
        self._listeners.append(fn)

    def __repr__(self) -> str:
        return f"State(version={self.snapshot.version!r}, applied={self.applied})"
