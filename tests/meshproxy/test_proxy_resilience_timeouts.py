"""Route timeouts, per-try timeouts and connect timeouts through the real data path.

Only generous bounds on elapsed time are asserted (a deadline is honoured: not much earlier,
not much later); the outcome itself (504 UT, a retry that succeeded, a reset client) is what
each test pins down."""

from __future__ import annotations

import asyncio

from meshproxy.config.model import ConnectionPool, LbKind, LoadBalancer, RetryPolicy
from tests.support.dataplane import running_dataplane
from tests.support.fakes import cluster, to_cluster
from tests.support.rawhttp import get, request
from tests.support.resilience import (
    Blackhole,
    fast_settings,
    route_snapshot,
    sequence,
    wait_quiescent,
)
from tests.support.upstream import Reply, UpstreamServer


def snap_for(ports: list[int], *, ckw: dict[str, object] | None = None, **rkw: object):  # type: ignore[no-untyped-def]
    return route_snapshot("svc", to_cluster("svc", **rkw), [cluster("svc", ports, **(ckw or {}))])


async def timed(coro):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await coro
    return r, loop.time() - t0


async def test_route_timeout_is_504_ut() -> None:
    async with UpstreamServer(Reply(delay=3.0)) as up:
        async with running_dataplane(snap_for([up.port], timeout=0.3), fast_settings()) as p:
            r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
            assert (r.status, r.body) == (504, b"upstream request timeout")
            assert 0.25 <= elapsed < 1.5
            assert p.metrics.requests[-1].flags == "UT"
            assert len(up.requests) == 1
            await wait_quiescent(p, "svc")


async def test_route_timeout_covers_every_retry_and_backoff() -> None:
    retries = RetryPolicy(attempts=50, retry_on=frozenset({"5xx"}))
    settings = fast_settings(retry_backoff_base=0.05, retry_backoff_max=0.1)
    async with UpstreamServer(Reply(503, delay=0.05)) as up:
        snap = snap_for([up.port], timeout=0.4, retries=retries)
        async with running_dataplane(snap, settings) as p:
            r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
            assert r.status == 504
            assert 0.35 <= elapsed < 1.5
            assert 1 < len(up.requests) < 20
            assert "UT" in p.metrics.requests[-1].flags.split(",")
            await wait_quiescent(p, "svc")


async def test_per_try_timeout_retries_a_slow_attempt() -> None:
    retries = RetryPolicy(attempts=2, per_try_timeout=0.2, retry_on=frozenset({"5xx"}))
    async with UpstreamServer(sequence(Reply(delay=3.0, body=b"slow"), Reply(body=b"fast"))) as up:
        async with running_dataplane(snap_for([up.port], retries=retries), fast_settings()) as p:
            r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
            assert (r.status, r.body) == (200, b"fast")
            assert 0.15 <= elapsed < 1.5
            assert [rec.header("x-envoy-attempt-count") for rec in up.requests] == ["1", "2"]
            assert up.connections == 2  # the timed-out connection was not reused
            await wait_quiescent(p, "svc")


async def test_per_try_timeout_slow_endpoint_then_fast_endpoint() -> None:
    retries = RetryPolicy(attempts=1, per_try_timeout=0.2, retry_on=frozenset({"reset"}))
    rr = LoadBalancer(kind=LbKind.ROUND_ROBIN)
    async with (
        UpstreamServer(Reply(delay=3.0, body=b"slow")) as slow,
        UpstreamServer(Reply(body=b"fast")) as fast,
    ):
        snap = snap_for([slow.port, fast.port], retries=retries, ckw={"lb": rr})
        async with running_dataplane(snap, fast_settings()) as p:
            for _ in range(4):
                r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
                assert (r.status, r.body) == (200, b"fast")
                assert elapsed < 1.5
            assert len(slow.requests) >= 2  # round robin sent half the first attempts there
            await wait_quiescent(p, "svc")


async def test_per_try_timeout_exhausted_is_504_ut() -> None:
    retries = RetryPolicy(attempts=2, per_try_timeout=0.15, retry_on=frozenset({"5xx"}))
    async with UpstreamServer(Reply(delay=3.0)) as up:
        async with running_dataplane(snap_for([up.port], retries=retries), fast_settings()) as p:
            r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
            assert r.status == 504
            assert 0.4 <= elapsed < 2.0
            assert len(up.requests) == 3
            flags = p.metrics.requests[-1].flags.split(",")
            assert "UT" in flags and "URX" in flags
            await wait_quiescent(p, "svc")


async def test_per_try_timeout_without_a_reset_token_is_not_retried() -> None:
    retries = RetryPolicy(attempts=2, per_try_timeout=0.15, retry_on=frozenset({"retriable-4xx"}))
    async with UpstreamServer(Reply(delay=3.0)) as up:
        async with running_dataplane(snap_for([up.port], retries=retries), fast_settings()) as p:
            r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
            assert r.status == 504 and elapsed < 1.0
            assert len(up.requests) == 1
            assert p.metrics.requests[-1].flags == "UT"


async def test_route_timeout_after_the_response_started_resets_the_client() -> None:
    slow_body = Reply(chunks=[b"part"] * 10, chunk_delay=0.25)
    async with UpstreamServer(slow_body) as up:
        async with running_dataplane(snap_for([up.port], timeout=0.4), fast_settings()) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            rest = b""
            try:
                async with asyncio.timeout(5):
                    while chunk := await reader.read(65536):
                        rest += chunk
            except ConnectionResetError:
                pass
            writer.close()
            assert not rest.endswith(b"0\r\n\r\n")  # the client never saw a complete body
            assert p.metrics.requests[-1].flags == "UT"
            assert p.metrics.requests[-1].code == 200
            await wait_quiescent(p, "svc")


async def test_connect_timeout_is_honoured_then_another_endpoint_tried() -> None:
    async with UpstreamServer(Reply(body=b"alive")) as up:
        with Blackhole() as hole:
            pool = ConnectionPool(connect_timeout=0.2)
            snap = snap_for([hole.port, up.port], ckw={"pool": pool})
            async with running_dataplane(snap, fast_settings()) as p:
                slow = 0
                for _ in range(30):
                    r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
                    assert (r.status, r.body) == (200, b"alive")
                    assert elapsed < 1.0
                    if elapsed >= 0.15:
                        slow += 1  # the first attempt waited out the connect deadline
                        if slow >= 2:
                            break
                assert slow >= 2
                assert p.metrics.count("retries") >= 2
                await wait_quiescent(p, "svc")


# --------------------------------------------------------------------------- stream idle


async def test_stream_idle_timeout_ends_a_request_whose_upstream_never_answers() -> None:
    """Istio's default route has no timeout: Envoy's stream_idle_timeout (here 0.3 s) is the
    deadline of a response head that never comes: 408 "stream timeout", flag SI."""
    from meshproxy.settings import Settings
    from tests.support.fakes import service_snapshot
    from tests.support.upstream import Reply, UpstreamServer

    async with UpstreamServer(Reply(delay=30.0)) as up:
        snap = service_snapshot("svc", [up.port])
        async with running_dataplane(snap, Settings(stream_idle_timeout=0.3)) as p:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await request(p.host, p.port, get(), timeout=10)
            assert r.status == 408 and r.body == b"stream timeout"
            assert 0.3 <= loop.time() - t0 < 5.0
            assert p.metrics.requests[0].flags == "SI"
            assert p.dp.active_requests == 0


async def test_stream_idle_timeout_spares_a_slow_but_moving_response() -> None:
    from meshproxy.settings import Settings
    from tests.support.fakes import service_snapshot
    from tests.support.upstream import Reply, UpstreamServer

    chunks = [b"x" * 10] * 12
    async with UpstreamServer(Reply(chunks=chunks, chunk_delay=0.1)) as up:
        snap = service_snapshot("svc", [up.port])
        async with running_dataplane(snap, Settings(stream_idle_timeout=0.4)) as p:
            r = await request(p.host, p.port, get(), timeout=10)  # 1.2 s, never 0.4 s idle
            assert r.status == 200 and r.body == b"".join(chunks)
            assert p.metrics.requests[0].flags == "-"
