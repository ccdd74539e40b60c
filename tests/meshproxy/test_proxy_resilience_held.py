"""A retriable response held through the backoff while the request body is still arriving.

The upstream here answers ``503`` as soon as it has the request head (an early error answer,
before the body): the response is held for the backoff (``Settings.retry_backoff_*`` set to
300 ms, the jitter pinned to 0.9) while the client keeps sending its body. These are the
interleavings a review found unsafe: body pieces written to the held connection, a per-try
timer armed by the body's end during the hold, a held ``Connection: close`` response."""

from __future__ import annotations

import asyncio

from meshproxy.config.model import RetryPolicy
from tests.support.dataplane import RunningPlane, running_dataplane
from tests.support.fakes import cluster, to_cluster
from tests.support.rawhttp import read_response
from tests.support.resilience import fast_settings, route_snapshot, wait_quiescent

FIVE_XX = RetryPolicy(attempts=1, retry_on=frozenset({"5xx"}), per_try_timeout=0.05)


class EarlyAnswer(asyncio.Protocol):
    """Answers 503 to every request head at once (without waiting for the body)."""

    def __init__(self, server: EarlyServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1

    def data_received(self, data: bytes) -> None:
        self.server.received += data
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.server.heads += 1
            assert self.transport is not None
            close = b"connection: close\r\n" if self.server.close else b""
            self.transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n" + close + b"\r\nearly"
            )
            if self.server.close:
                self.transport.close()
            self.buf = b""  # the rest is body: not parsed


class EarlyServer:
    def __init__(self, close: bool = False) -> None:
        self.close = close
        self.connections = 0
        self.heads = 0
        self.received = b""
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> EarlyServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: EarlyAnswer(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def held_settings(**kw: object):  # type: ignore[no-untyped-def]
    return fast_settings(retry_backoff_base=0.3, retry_backoff_max=0.3, **kw)


async def post_in_two_parts(p: RunningPlane, first: bytes, rest: bytes, pause: float) -> bytes:
    """POST ``first + rest`` with a pause between the parts; returns the raw response."""
    reader, writer = await asyncio.open_connection(p.host, p.port)
    total = len(first) + len(rest)
    writer.write(b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: %d\r\n\r\n" % total + first)
    await writer.drain()
    await asyncio.sleep(pause)
    writer.write(rest)
    await writer.drain()
    r = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    return r  # type: ignore[return-value]


def pin_jitter(p: RunningPlane) -> None:
    p.dp._proxy.random = lambda: 0.9  # type: ignore[union-attr]  # backoff 270 ms


async def test_body_overflowing_the_replay_buffer_during_a_hold_is_507_never_truncated() -> None:
    async with EarlyServer() as up:
        snap = route_snapshot(
            "svc", to_cluster("svc", retries=FIVE_XX), [cluster("svc", [up.port])]
        )
        async with running_dataplane(snap, held_settings(retry_buffer_bytes=1000)) as p:
            pin_jitter(p)
            r = await post_in_two_parts(p, b"A" * 500, b"Z" * 4500, pause=0.1)
            assert r.status == 507  # type: ignore[attr-defined]
            assert up.heads == 1  # no retry with a truncated body
            assert b"Z" not in up.received  # nothing went to the held connection
            await wait_quiescent(p, "svc")


async def test_per_try_timer_is_not_armed_by_the_body_ending_during_a_hold() -> None:
    async with EarlyServer() as up:
        snap = route_snapshot(
            "svc", to_cluster("svc", retries=FIVE_XX), [cluster("svc", [up.port])]
        )
        async with running_dataplane(snap, held_settings()) as p:
            pin_jitter(p)
            # the body ends 100 ms into the 270 ms hold: a per-try timer (50 ms) armed then
            # would fire inside the hold and start a second, overlapping attempt
            r = await post_in_two_parts(p, b"a" * 10, b"b" * 10, pause=0.1)
            assert r.status == 503 and r.body == b"early"  # type: ignore[attr-defined]
            assert up.heads == 2  # the first attempt and one retry, never more
            assert [m.flags for m in p.metrics.requests] == ["URX"]
            await wait_quiescent(p, "svc")


async def test_held_connection_close_response_then_retry() -> None:
    async with EarlyServer(close=True) as up:
        snap = route_snapshot(
            "svc", to_cluster("svc", retries=FIVE_XX), [cluster("svc", [up.port])]
        )
        async with running_dataplane(snap, held_settings()) as p:
            pin_jitter(p)
            r = await post_in_two_parts(p, b"a" * 10, b"b" * 10, pause=0.1)
            assert r.status == 503 and r.body == b"early"  # type: ignore[attr-defined]
            assert up.heads == 2 and up.connections == 2
            # the retry carried the whole body
            assert up.received.count(b"a" * 10 + b"b" * 10) == 1
            await wait_quiescent(p, "svc")
