"""Run a real :class:`~meshproxy.dataplane.DataPlane` in-process on 127.0.0.1:0 for tests.

``async with running_dataplane(snapshot, settings) as dp:`` applies ``snapshot`` to a fresh
``State``, starts an outbound listener on an OS-chosen port and yields a :class:`RunningPlane`
(``host``, ``port``, the ``DataPlane``, its ``State`` and a :class:`FakeMetrics`); everything is
closed on exit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from meshproxy.config.model import Snapshot
from meshproxy.dataplane import DataPlane
from meshproxy.settings import Settings
from meshproxy.state import State
from tests.support.fakes import FakeMetrics


@dataclass
class RunningPlane:
    dp: DataPlane
    state: State
    metrics: FakeMetrics
    host: str
    port: int


@asynccontextmanager
async def running_dataplane(
    snapshot: Snapshot, settings: Settings | None = None
) -> AsyncIterator[RunningPlane]:
    state = State()
    state.apply(snapshot)
    metrics = FakeMetrics()
    dp = DataPlane(state, metrics, settings or Settings())  # type: ignore[arg-type]
    host, port = await dp.start_outbound("127.0.0.1", 0)
    try:
        yield RunningPlane(dp, state, metrics, host, port)
    finally:
        await dp.close()
