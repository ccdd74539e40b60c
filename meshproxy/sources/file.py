"""Standalone config source: Istio YAML files -> Snapshot, re-applied when the files change.

Theory of operation
-------------------
The one translation lives in ``control.istio``; this module only drives it. At start-up
:meth:`FileSource.load_initial` builds a snapshot synchronously (problems are fatal: the caller
exits 2 with them). :meth:`FileSource.watch` then waits on ``watchfiles.awatch`` for changes
under the configured paths (the parent directory of a file path is watched, so editors that
replace a file by renaming are seen) and, once the files have been quiet for
``Settings.reload_debounce``, calls :meth:`FileSource.reload`.

A reload parses and translates in a worker thread (``asyncio.to_thread``), so even a
10,000-host config never holds the event loop for more than the GIL switch interval; only the
final ``state.apply`` (one reference swap) runs on the loop. The outcome is one of:

* problems -> every problem line logged at WARNING, ``state.reject`` records them (admin
  ``/config_dump`` shows ``last_error``), the last good snapshot stays live;
* the same ``version`` as the live snapshot -> nothing happens (no swap, no pool churn);
* otherwise -> ``state.apply(snapshot)``, then ``gc.freeze()`` so the cyclic garbage collector
  stops rescanning the long-lived snapshot (a full collection over a big snapshot would hold
  the GIL, and so the event loop, for a noticeable time).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshproxy.capabilities import unsupported
from meshproxy.config.model import ProxyIdentity, Snapshot
from meshproxy.settings import Settings
from meshproxy.state import State

log = logging.getLogger("meshproxy.sources.file")


class Report(Protocol):
    problems: list[str]
    warnings: list[str]


Builder = Callable[[list[str], ProxyIdentity], tuple[Snapshot | None, Report]]


class ReloadRecorder(Protocol):
    def config_reload(self, result: str) -> None: ...


def incremental_builder(proxy: ProxyIdentity) -> Builder:
    """The default builder: a :class:`control.istio.IncrementalBuilder` for ``proxy``, so a
    reload re-reads and re-translates only what changed (same answers as ``build_snapshot``)."""
    from control.istio import IncrementalBuilder

    current = [IncrementalBuilder(proxy)]

    def build(paths: list[str], for_proxy: ProxyIdentity) -> tuple[Snapshot | None, Report]:
        if for_proxy != current[0].proxy:  # another identity: its caches do not apply
            current[0] = IncrementalBuilder(for_proxy)
        return current[0].build(paths)

    return build


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one build attempt gave: ``snapshot`` is None when there were problems."""

    snapshot: Snapshot | None
    problems: tuple[str, ...]
    warnings: tuple[str, ...]


class ConfigError(Exception):
    """The initial config has problems; ``problems`` are formatted lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


class FileSource:
    """Feeds ``state`` from Istio YAML under ``paths`` (files or directories)."""

    def __init__(
        self,
        paths: Sequence[str],
        proxy: ProxyIdentity,
        state: State,
        settings: Settings,
        metrics: ReloadRecorder | None = None,
        build: Builder | None = None,
    ) -> None:
        self.paths = [os.path.abspath(p) for p in paths]
        self.proxy = proxy
        self.state = state
        self.settings = settings
        self.metrics = metrics
        # Builds run one at a time (start-up, then each reload in turn), so the incremental
        # builder's caches are never used by two threads at once.
        self._build = build if build is not None else incremental_builder(proxy)
        self.reloads = 0  # reload attempts that reached a verdict (applied/unchanged/rejected)

    def __repr__(self) -> str:
        return f"FileSource(paths={self.paths!r}, version={self.state.snapshot.version!r})"

    # ------------------------------------------------------------------ building

    def build(self) -> LoadResult:
        """Parse, validate and translate (blocking: call from a thread once running)."""
        try:
            snapshot, report = self._build(list(self.paths), self.proxy)
        except Exception as e:  # a bug in translation must not take the proxy down
            log.exception("config build failed")
            return LoadResult(None, (f"internal error while building config: {e!r}",), ())
        problems = tuple(report.problems)
        if problems or snapshot is None:
            return LoadResult(None, problems or ("config produced no snapshot",), ())
        if snapshot.version == self.state.snapshot.version:
            return LoadResult(snapshot, (), ())  # unchanged: nothing will be applied or said
        return LoadResult(snapshot, (), (*report.warnings, *unsupported(snapshot)))

    def load_initial(self) -> Snapshot:
        """Build and apply the start-up config; raise :class:`ConfigError` on problems."""
        return self._initial(self.build())

    async def load_initial_async(self) -> Snapshot:
        """:meth:`load_initial` with the build in a thread, so the loop (admin) keeps serving."""
        return self._initial(await asyncio.to_thread(self.build))

    def _initial(self, result: LoadResult) -> Snapshot:
        if result.snapshot is None:
            raise ConfigError(result.problems)
        for w in result.warnings:
            log.warning("%s", w)
        self._apply(result.snapshot)
        return result.snapshot

    async def reload(self) -> bool:
        """Rebuild off the loop and apply it if valid and changed; True when swapped.

        The cyclic GC stays off from the start of the build until its objects are frozen:
        otherwise the first collection after the build (the loader re-enables it on return)
        scans the hundreds of thousands of young objects a big config allocates, holding the
        GIL, and so the event loop, for ~150 ms at 10,000 hosts. ``gc.freeze()`` then moves
        them (the new snapshot and the incremental builder's caches, all long-lived) out of
        the collector's generations, which costs O(1).
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return await self._reload()
        finally:
            gc.freeze()
            if was_enabled:
                gc.enable()

    async def _reload(self) -> bool:
        result = await asyncio.to_thread(self.build)
        self.reloads += 1
        if result.snapshot is None:
            for p in result.problems:
                log.warning("config rejected: %s", p)
            log.warning(
                "keeping config version %s after %d problem(s)",
                self.state.snapshot.version,
                len(result.problems),
            )
            self.state.reject("\n".join(result.problems))
            if self.metrics is not None:
                self.metrics.config_reload("rejected")
            return False
        if result.snapshot.version == self.state.snapshot.version:
            log.debug("config unchanged (version %s)", result.snapshot.version)
            if self.state.last_error is not None:
                self.state.last_error = None  # the bad edit was reverted
            return False
        for w in result.warnings:
            log.warning("%s", w)
        self._apply(result.snapshot)
        return True

    def _apply(self, snapshot: Snapshot) -> None:
        self.state.apply(snapshot)
        # The snapshot lives until the next reload: move it (and everything else alive now) out
        # of the cyclic GC's generations, so later collections do not rescan a 10,000-host
        # object graph while holding the GIL. Snapshots are acyclic, so reference counting
        # still frees a replaced one.
        gc.freeze()
        if self.metrics is not None:
            self.metrics.config_reload("success")
        log.info(
            "applied config version %s (%d clusters)", snapshot.version, len(snapshot.clusters)
        )

    # ------------------------------------------------------------------ watching

    def watch_roots(self) -> list[str]:
        """Directories to watch: each config directory, and each config file's parent."""
        roots: list[str] = []
        for p in self.paths:
            root = p if os.path.isdir(p) else os.path.dirname(p)
            if root not in roots:
                roots.append(root)
        return roots

    def is_relevant(self, path: str) -> bool:
        """True when a change at ``path`` can alter the config."""
        path = os.path.abspath(path)
        for p in self.paths:
            if path == p:
                return True
            if path.startswith(p + os.sep) and os.path.isdir(p):
                name = os.path.basename(path)
                if name.startswith(".") or name.endswith("~"):
                    return False  # editor swap / backup files
                return True
        return False

    async def watch(self, stop: asyncio.Event | None = None) -> None:
        """Reload on every relevant change until cancelled or ``stop`` is set."""
        from watchfiles import awatch

        step_ms = max(10, int(self.settings.reload_debounce * 1000))
        async for changes in awatch(
            *self.watch_roots(),
            watch_filter=lambda _change, path: self.is_relevant(path),
            step=step_ms,
            debounce=1000,
            stop_event=stop,
            recursive=True,
        ):
            log.debug("config change: %s", sorted(p for _, p in changes))
            await self.reload()
