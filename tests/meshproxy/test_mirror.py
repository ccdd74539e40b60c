"""Tests for meshproxy.mirror: the -shadow authority rewrite (pure) and the fire-and-forget
sender against real HTTP/1.1 upstreams on 127.0.0.1 (tests.support.upstream)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager

import pytest
import uvloop

from meshproxy.config.model import Cluster, ConnectionPool, LbKind, LoadBalancer
from meshproxy.http.codec import BodyFraming, build_request_head, encode_chunk
from meshproxy.mirror import Mirrorer, shadow_authority, shadow_request_head
from meshproxy.settings import Settings
from meshproxy.upstream.connection import UpstreamConnection
from meshproxy.upstream.pool import ClusterState, EndpointState, Pools
from tests.support import loops
from tests.support.fakes import FakeMetrics, cluster
from tests.support.upstream import Handler, Reply, UpstreamServer

# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        (b"reviews", b"reviews-shadow"),
        (b"reviews:9080", b"reviews-shadow:9080"),
        (
            b"reviews.default.svc.cluster.local:9080",
            b"reviews.default.svc.cluster.local-shadow:9080",
        ),
        (b"10.0.0.1:80", b"10.0.0.1-shadow:80"),
        (b"[::1]:8080", b"[::1]-shadow:8080"),  # Envoy: the port follows the last ']'
        (b"[fe80::1]", b"[fe80::1]-shadow"),  # colons inside the brackets are no port
        (b"fe80::1", b"fe80::1-shadow"),  # bare IPv6 (not valid in Host): no port split
        (b"host:", b"host-shadow:"),  # Envoy splits at the last colon even with no digits
    ],
)
def test_shadow_authority(authority: bytes, expected: bytes) -> None:
    assert shadow_authority(authority) == expected


def _head(
    host: bytes,
    method: bytes = b"POST",
    framing: BodyFraming = BodyFraming.LENGTH,
    length: int | None = 4,
) -> bytes:
    head, _ = build_request_head(
        method,
        b"/api/v1?q=host:x",
        [(b"user-agent", b"t"), (b"x-host", b"reviews:9080")],
        host=host,
        client_ip=b"10.1.2.3",
        scheme=b"http",
        framing=framing,
        content_length=length,
    )
    return head


def test_shadow_request_head_rewrites_only_the_host_line() -> None:
    head = _head(b"reviews:9080")
    out = shadow_request_head(head)
    assert out == head.replace(b"\r\nhost: reviews:9080\r\n", b"\r\nhost: reviews-shadow:9080\r\n")
    assert b"x-host: reviews:9080\r\n" in out  # a header *named* like host is untouched
    assert out.startswith(b"POST /api/v1?q=host:x HTTP/1.1\r\n")
    assert out.endswith(b"content-length: 4\r\n\r\n")


def test_shadow_request_head_any_case_and_spacing_and_no_host() -> None:
    head = b"GET / HTTP/1.1\r\nAccept: */*\r\nHost:   [::1]:80  \r\n\r\n"
    assert (
        shadow_request_head(head)
        == b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: [::1]-shadow:80\r\n\r\n"
    )
    no_host = b"GET / HTTP/1.1\r\naccept: */*\r\n\r\n"
    assert shadow_request_head(no_host) == no_host
    # a "host:" that appears only after the head (in a body glued on) is not touched
    glued = b"GET / HTTP/1.1\r\na: b\r\n\r\n\r\nhost: x\r\n"
    assert shadow_request_head(glued) == glued


# --------------------------------------------------------------------------- helpers


# every async test here runs on both loops; test_runs_on_the_requested_loop fails if the
# override stops working
pytestmark = loops.OVERRIDE_WARNING
event_loop_policy = loops.event_loop_policy


async def test_runs_on_the_requested_loop(event_loop_policy: object) -> None:
    wanted = isinstance(event_loop_policy, uvloop.EventLoopPolicy)
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) is wanted


@asynccontextmanager
async def serve(*handlers: Handler | Reply) -> AsyncIterator[list[UpstreamServer]]:
    """Recording upstreams on 127.0.0.1:0. On the asyncio loop they share the test's loop; on
    uvloop (whose transports tests.support.upstream does not accept) they run on an asyncio
    loop in a thread of their own, stopped on exit."""
    servers = [UpstreamServer(h) for h in handlers]
    if not isinstance(asyncio.get_running_loop(), uvloop.Loop):
        for up in servers:
            await up.start()
        try:
            yield servers
        finally:
            for up in servers:
                await up.close()
        return
    loop = asyncio.SelectorEventLoop()  # not the policy's (uvloop) loop
    thread = threading.Thread(target=loop.run_forever, name="upstream", daemon=True)
    thread.start()

    async def on_thread(coro: Coroutine[object, object, object]) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    try:
        for up in servers:
            await on_thread(up.start())
        yield servers
    finally:
        for up in servers:
            await on_thread(up.close())
        await on_thread(asyncio.sleep(0.01))  # the cancelled reply tasks finish
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 5)
        loop.close()


def make(
    ports: list[int], settings: Settings | None = None, rand: Callable[[], float] | None = None
) -> tuple[Mirrorer, Pools, Cluster]:
    s = settings or Settings()
    pools = Pools(FakeMetrics(), s)  # type: ignore[arg-type]
    m = Mirrorer(pools, s) if rand is None else Mirrorer(pools, s, rand)
    return m, pools, cluster("reviews-mirror", ports)


async def settle(m: Mirrorer, timeout: float = 3.0) -> None:
    """Wait (bounded) until no copy is in flight."""
    async with asyncio.timeout(timeout):
        while m.inflight:
            await asyncio.sleep(0.005)


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, never listened, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def mirror_tasks() -> list[asyncio.Task[object]]:
    """The mirrorer's connect tasks still alive (the upstream server's own tasks excluded)."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "_Shadow._connect" and not t.done()
    ]


def counters(m: Mirrorer) -> tuple[int, int, int, int, int]:
    return (m.sent, m.completed, m.failed, m.dropped, m.inflight)


# --------------------------------------------------------------------------- real sockets


async def test_copy_arrives_shadowed_with_same_method_path_and_body() -> None:
    async with serve(Reply(body=b"mirror answer")) as [up]:
        m, pools, c = make([up.port])
        head = shadow_request_head(_head(b"reviews:9080", length=4))
        t0 = time.perf_counter()
        m.send(c, head, b"ping", 1.0)
        assert time.perf_counter() - t0 < 0.05  # returns at once
        assert up.requests == [] and m.inflight == 1  # nothing done synchronously
        await settle(m)
        assert counters(m) == (1, 1, 0, 0, 0)
        [rec] = up.requests
        assert rec.method == "POST" and rec.target == "/api/v1?q=host:x"
        assert rec.header("host") == "reviews-shadow:9080"
        assert rec.header("content-length") == "4" and rec.body == b"ping"
        assert rec.header("x-forwarded-for") == "10.1.2.3"
        assert pools.cluster_state(c).endpoints[0].active == 0
        pools.close()


async def test_chunked_body_is_mirrored() -> None:
    async with serve(Reply()) as [up]:
        m, pools, c = make([up.port])
        head = shadow_request_head(_head(b"ratings", framing=BodyFraming.CHUNKED, length=None))
        body = encode_chunk(b"hello ") + encode_chunk(b"world") + b"0\r\n\r\n"
        m.send(c, head, body, 1.0)
        await settle(m)
        assert counters(m) == (1, 1, 0, 0, 0)
        [rec] = up.requests
        assert rec.header("host") == "ratings-shadow"
        assert rec.header("transfer-encoding") == "chunked"
        assert rec.body == b"hello world"
        pools.close()


async def test_connections_are_reused_and_responses_of_any_kind_complete() -> None:
    replies = iter(
        [
            Reply(status=503, body=b"down"),  # a mirror's 5xx is still a complete response
            Reply(chunks=[b"a", b"bc"]),
            Reply(body=b"x" * 200_000),
            Reply(status=204, no_content_length=True, body=b""),
        ]
    )
    async with serve(lambda rec: next(replies)) as [up]:
        m, pools, c = make([up.port])
        head = shadow_request_head(_head(b"svc", method=b"GET", framing=BodyFraming.NONE))
        for _ in range(4):
            m.send(c, head, b"", 1.0)
            await settle(m)
        assert counters(m) == (4, 4, 0, 0, 0)
        assert up.connections == 1
        assert {r.conn_id for r in up.requests} == {up.requests[0].conn_id}
        assert pools.idle_connections() == 1
        pools.close()


async def test_head_request_completes_at_its_head_and_keeps_the_connection() -> None:
    async with serve(Reply(body=b"ignored-by-llhttp")) as [up]:
        m, pools, c = make([up.port])
        head = shadow_request_head(_head(b"svc", method=b"HEAD", framing=BodyFraming.NONE))
        for _ in range(2):
            m.send(c, head, b"", 1.0)
            await settle(m)
        assert counters(m) == (2, 2, 0, 0, 0)
        assert [r.method for r in up.requests] == ["HEAD", "HEAD"]
        assert up.connections == 1
        pools.close()


async def test_connection_close_and_close_delimited_responses_are_not_reused() -> None:
    replies = iter([Reply(close=True), Reply(close_delimited=True, body=b"till fin"), Reply()])
    async with serve(lambda rec: next(replies)) as [up]:
        m, pools, c = make([up.port])
        head = shadow_request_head(_head(b"svc", method=b"GET", framing=BodyFraming.NONE))
        for _ in range(3):
            m.send(c, head, b"", 1.0)
            await settle(m)
        # a close-delimited body ended by the FIN is a complete response, not a failure
        assert counters(m) == (3, 3, 0, 0, 0)
        assert up.connections == 3
        pools.close()


async def test_mirror_that_never_answers_times_out_and_is_aborted() -> None:
    async with serve(Reply(delay=30)) as [up]:
        m, pools, c = make([up.port])
        head = shadow_request_head(_head(b"svc"))
        t0 = time.perf_counter()
        m.send(c, head, b"body", 0.2)
        assert time.perf_counter() - t0 < 0.05
        await settle(m)
        elapsed = time.perf_counter() - t0
        assert 0.15 < elapsed < 2.0
        assert counters(m) == (1, 0, 1, 0, 0)
        assert pools.idle_connections() == 0
        async with asyncio.timeout(2):  # the aborted connection reaches the upstream
            while up.open_connections:
                await asyncio.sleep(0.01)
        assert pools.cluster_state(c).endpoints[0].active == 0


@pytest.mark.parametrize(
    "reply",
    [
        Reply(reset=True),
        Reply(silent_close=True),
        Reply(raw=b"this is not http\r\n\r\n"),
        Reply(raw=b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", raw_reset=True),
    ],
    ids=["reset", "fin-before-response", "garbage", "truncated-body"],
)
async def test_broken_mirror_is_contained_and_counted(reply: Reply) -> None:
    async with serve(reply) as [up]:
        m, pools, c = make([up.port])
        m.send(c, shadow_request_head(_head(b"svc")), b"body", 2.0)
        await settle(m)
        assert counters(m) == (1, 0, 1, 0, 0)
        assert pools.idle_connections() == 0
        assert pools.cluster_state(c).endpoints[0].active == 0


async def test_refused_connect_and_no_endpoint_are_failures() -> None:
    m, _, c = make([closed_port()])
    head = shadow_request_head(_head(b"svc"))
    m.send(c, head, b"body", 2.0)
    await settle(m)
    assert counters(m) == (1, 0, 1, 0, 0)
    empty = cluster("empty", [])
    m.send(empty, head, b"body", 2.0)  # no endpoint: settled synchronously
    assert counters(m) == (2, 0, 2, 0, 0)


async def test_connect_that_hangs_is_bounded_by_the_mirror_deadline() -> None:
    started = asyncio.Event()

    class HangingPools(Pools):
        async def connect(
            self, cs: ClusterState, ep: EndpointState, *, reserved: bool = False
        ) -> UpstreamConnection:
            started.set()
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    s = Settings()
    pools = HangingPools(FakeMetrics(), s)  # type: ignore[arg-type]
    m = Mirrorer(pools, s)
    c = cluster("blackhole", [9], pool=ConnectionPool(connect_timeout=3600.0))
    m.send(c, shadow_request_head(_head(b"svc")), b"body", 0.1)
    await started.wait()
    await settle(m)
    assert counters(m) == (1, 0, 1, 0, 0)
    await asyncio.sleep(0)  # the cancelled connect task ends on the next turn
    assert mirror_tasks() == []


async def test_inflight_bound_drops_and_counts() -> None:
    async with serve(Reply(delay=0.2)) as [up]:
        m, pools, c = make([up.port], Settings(mirror_max_inflight=2))
        head = shadow_request_head(_head(b"svc"))
        for _ in range(5):
            m.send(c, head, b"body", 2.0)
        assert counters(m) == (2, 0, 0, 3, 2)
        await settle(m)
        assert counters(m) == (2, 2, 0, 3, 0)
        assert len(up.requests) == 2
        m.send(c, head, b"body", 2.0)  # room again
        await settle(m)
        assert counters(m) == (3, 3, 0, 3, 0)
        pools.close()


async def test_mirror_cluster_max_connections_is_respected() -> None:
    """A copy never opens a connection past the mirror cluster's maxConnections: with one
    connection busy, the next copies fail at once (counted) instead of connecting."""
    from dataclasses import replace

    from meshproxy.config.model import ConnectionPool

    async with serve(Reply(delay=0.3)) as [up]:
        m, pools, c = make([up.port])
        c = replace(c, pool=ConnectionPool(max_connections=1))
        head = shadow_request_head(_head(b"svc"))
        m.send(c, head, b"body", 2.0)
        m.send(c, head, b"body", 2.0)
        m.send(c, head, b"body", 2.0)
        assert counters(m) == (3, 0, 2, 0, 1)
        await settle(m)
        assert counters(m) == (3, 1, 2, 0, 0) and len(up.requests) == 1
        pools.close()


async def test_body_larger_than_the_shadow_buffer_is_abandoned() -> None:
    async with serve(Reply()) as [up]:
        m, pools, c = make([up.port], Settings(retry_buffer_bytes=1000))
        big = b"x" * 1001
        m.send(c, shadow_request_head(_head(b"svc", length=len(big))), big, 1.0)
        assert counters(m) == (0, 0, 0, 1, 0)
        fits = b"y" * 1000
        m.send(c, shadow_request_head(_head(b"svc", length=len(fits))), fits, 1.0)
        await settle(m)
        assert counters(m) == (1, 1, 0, 1, 0)
        assert [r.body for r in up.requests] == [fits]
        pools.close()


async def test_bad_timeout_is_counted_not_raised() -> None:
    async with serve(Reply()) as [up]:
        m, _, c = make([up.port])
        head = shadow_request_head(_head(b"svc"))
        for bad in (0.0, -1.0, float("inf"), float("nan")):
            m.send(c, head, b"body", bad)
        assert counters(m) == (4, 0, 4, 0, 0)
        await asyncio.sleep(0.05)
        assert up.connections == 0


async def test_picks_endpoints_with_the_injected_random() -> None:
    async with serve(Reply(), Reply()) as [a, b]:
        s = Settings()
        pools = Pools(FakeMetrics(), s)  # type: ignore[arg-type]
        c = cluster("two", [a.port, b.port], lb=LoadBalancer(kind=LbKind.RANDOM))
        values = iter([0.1, 0.9, 0.1])
        m = Mirrorer(pools, s, lambda: next(values))
        head = shadow_request_head(_head(b"svc"))
        for _ in range(3):
            m.send(c, head, b"body", 1.0)
            await settle(m)
        assert (len(a.requests), len(b.requests)) == (2, 1)
        pools.close()


async def test_close_ends_everything_in_flight_and_drops_later_copies() -> None:
    async with serve(Reply(delay=30)) as [up]:
        m, pools, c = make([up.port])
        head = shadow_request_head(_head(b"svc"))
        m.send(c, head, b"body", 30.0)
        async with asyncio.timeout(2):  # first copy on the wire, waiting for its answer
            while not up.requests:
                await asyncio.sleep(0.005)
        m.send(c, head, b"body", 30.0)  # a second copy: its connect task not even started
        assert m.inflight == 2 and len(mirror_tasks()) == 1
        await m.close()
        assert counters(m) == (2, 0, 2, 0, 0)
        assert mirror_tasks() == []
        assert all(ep.active == 0 for ep in pools.cluster_state(c).endpoints)
        m.send(c, head, b"body", 30.0)
        assert counters(m) == (2, 0, 2, 1, 0)
        async with asyncio.timeout(2):
            while up.open_connections:
                await asyncio.sleep(0.01)
        await m.close()  # idempotent
