"""Helpers for the resilience tests: misbehaving endpoints, snapshots, counter checks.

Theory of operation
-------------------
The resilience tests drive a real :class:`~meshproxy.dataplane.DataPlane` against real sockets
on 127.0.0.1 and assert on what the upstreams saw and on the data plane's circuit-breaker
counters. This module holds what they share:

* endpoints that misbehave below HTTP: :func:`closed_port` (connect refused),
  :class:`Blackhole` (a listener whose accept queue is full, so a connect hangs until its
  deadline) and :class:`ResetServer` (accepts, reads a few bytes, then resets with an RST);
* :func:`sequence` -- a handler answering one :class:`~tests.support.upstream.Reply` after
  another (the last one repeats), for status sequences;
* :func:`fast_settings` -- :class:`~meshproxy.settings.Settings` with a tiny retry backoff so
  retries do not slow the suite (the backoff formula itself is unit-tested in core/retry);
* :class:`MaxCounters` -- a :class:`~meshproxy.upstream.pool.ClusterCounters` that remembers
  the highest value each count ever reached, installed with :func:`track_counters` before the
  first request, so "never more than N concurrent retries" is asserted exactly rather than by
  sampling;
* :func:`wait_quiescent` -- waits until every counter is back to 0 and ``cx_active`` equals
  the connections actually open, and fails the test with the counters' repr otherwise.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from meshproxy.config.model import Cluster, Route, Snapshot
from meshproxy.settings import Settings
from meshproxy.upstream.pool import ClusterCounters
from tests.support.dataplane import RunningPlane
from tests.support.fakes import snapshot, vhost
from tests.support.upstream import Recorded, Reply


def fast_settings(**kw: Any) -> Settings:
    """Settings with a 1..5 ms backoff (everything else as given or default)."""
    kw.setdefault("retry_backoff_base", 0.001)
    kw.setdefault("retry_backoff_max", 0.005)
    return Settings(**kw)


def route_snapshot(host: str, route: Route, clusters: list[Cluster]) -> Snapshot:
    """``host`` served by the single ``route``, with ``clusters`` in the snapshot."""
    return snapshot([vhost(host, (route,))], clusters)


def sequence(*replies: Reply) -> Callable[[Recorded], Reply]:
    """A handler answering ``replies`` in order; the last one answers every later request."""
    it = list(replies)

    def handler(rec: Recorded) -> Reply:
        return it.pop(0) if len(it) > 1 else it[0]

    return handler


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (connects are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class Blackhole:
    """A listener that never accepts, its accept queue filled: a connect to it hangs (SYNs go
    unanswered) until the connector's own deadline. Close it with :meth:`close`."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(0)
        self.port: int = self._sock.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self._fillers.append(s)

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self._sock.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ResetConn(asyncio.Protocol):
    def __init__(self, server: ResetServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        self.server.conns.append(self)

    def data_received(self, data: bytes) -> None:
        self.server.received.append(data)
        self.seen += len(data)
        t = self.transport
        if t is not None and self.seen >= self.server.after_bytes and not t.is_closing():
            sock = t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.abort()


class ResetServer:
    """Accepts connections and resets each (RST) once ``after_bytes`` bytes arrived on it,
    without answering anything. ``received`` keeps every byte it read."""

    def __init__(self, after_bytes: int = 1) -> None:
        self.after_bytes = after_bytes
        self.connections = 0
        self.received: list[bytes] = []
        self.conns: list[_ResetConn] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ResetServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ResetConn(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()
        await self._server.wait_closed()


class MaxCounters(ClusterCounters):
    """Cluster counters that remember the highest value each one reached."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.values: dict[str, int] = {}
        super().__init__()

    def __getattribute__(self, name: str) -> Any:
        if name in ("rq_active", "rq_pending", "retries_active", "cx_active"):
            return object.__getattribute__(self, "values")[name]
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("rq_active", "rq_pending", "retries_active", "cx_active"):
            self.values[name] = value
            if value > self.peak.get(name, 0):
                self.peak[name] = value
            return
        object.__setattr__(self, name, value)


def track_counters(p: RunningPlane, cluster_name: str) -> MaxCounters:
    """Install :class:`MaxCounters` for ``cluster_name`` (before its first request)."""
    pools = p.dp._pools
    assert cluster_name not in pools.states(), "install before the cluster's first request"
    mc = MaxCounters()
    pools._counters[cluster_name] = mc
    return mc


def counters(p: RunningPlane, cluster_name: str) -> ClusterCounters:
    return p.dp._pools.states()[cluster_name].counters


async def wait_quiescent(p: RunningPlane, cluster_name: str, timeout: float = 3.0) -> None:
    """Wait until the cluster's counters are all back to zero (``cx_active`` equal to the
    connections its endpoints have open) and no request is active; fail otherwise."""
    cs = p.dp._pools.states()[cluster_name]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        c = cs.counters
        open_conns = sum(ep.conns for ep in cs.endpoints)
        active = sum(ep.active for ep in cs.endpoints)
        waiters = sum(len(ep.waiters) for ep in cs.endpoints)
        ok = (
            c.rq_active == 0
            and c.rq_pending == 0
            and c.retries_active == 0
            and c.cx_active == open_conns
            and active == 0
            and waiters == 0
            and p.dp.active_requests == 0
        )
        if ok:
            return
        if loop.time() > deadline:
            raise AssertionError(
                f"not quiescent: {c!r} open={open_conns} active={active} waiters={waiters}"
                f" requests={p.dp.active_requests}"
            )
        await asyncio.sleep(0.01)
