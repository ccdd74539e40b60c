"""Fault injection and request mirroring through the real data path.

Faults at fraction 1.0 / 0.0 are deterministic whatever the random draw. Mirrors are
fire-and-forget: the tests wait (bounded) for the copy at the mirror upstream, and check that a
slow, refusing or resetting mirror never changes the primary's answer or its timing."""

from __future__ import annotations

import asyncio

from meshproxy.config.model import FaultPolicy, Mirror
from tests.support.dataplane import running_dataplane
from tests.support.fakes import cluster, to_cluster
from tests.support.rawhttp import get, request
from tests.support.resilience import closed_port, fast_settings, route_snapshot
from tests.support.upstream import Reply, UpstreamServer


async def timed(coro):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await coro
    return r, loop.time() - t0


def fault_snap(port: int, fault: FaultPolicy):  # type: ignore[no-untyped-def]
    return route_snapshot("svc", to_cluster("svc", fault=fault), [cluster("svc", [port])])


def mirror_snap(port: int, mirror_port: int, fraction: float = 1.0):  # type: ignore[no-untyped-def]
    m = Mirror(cluster="shadow", host="shadow", fraction=fraction)
    return route_snapshot(
        "svc",
        to_cluster("svc", mirrors=(m,)),
        [cluster("svc", [port]), cluster("shadow", [mirror_port])],
    )


async def until(pred, timeout: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --------------------------------------------------------------------------- fault


async def test_fault_delay_then_upstream_response_flag_di() -> None:
    async with UpstreamServer(Reply(body=b"real")) as up:
        fault = FaultPolicy(delay=0.3, delay_fraction=1.0)
        async with running_dataplane(fault_snap(up.port, fault), fast_settings()) as p:
            r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
            assert (r.status, r.body) == (200, b"real")
            assert 0.3 <= elapsed < 1.5
            assert p.metrics.requests[-1].flags == "DI"
            assert len(up.requests) == 1


async def test_fault_abort_never_contacts_the_upstream_flag_fi() -> None:
    async with UpstreamServer(Reply(body=b"real")) as up:
        fault = FaultPolicy(abort_status=418, abort_fraction=1.0)
        async with running_dataplane(fault_snap(up.port, fault), fast_settings()) as p:
            for _ in range(3):
                r = await request(p.host, p.port, get())
                assert (r.status, r.body) == (418, b"fault filter abort")
            assert [m.flags for m in p.metrics.requests] == ["FI"] * 3
            await asyncio.sleep(0.05)
            assert up.connections == 0 and up.raw_bytes == 0


async def test_fault_fraction_zero_leaves_requests_untouched() -> None:
    async with UpstreamServer(Reply(body=b"real")) as up:
        fault = FaultPolicy(delay=5.0, delay_fraction=0.0, abort_status=500, abort_fraction=0.0)
        async with running_dataplane(fault_snap(up.port, fault), fast_settings()) as p:
            for _ in range(10):
                r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
                assert (r.status, r.body) == (200, b"real") and elapsed < 1.0
            assert {m.flags for m in p.metrics.requests} == {"-"}
            assert len(up.requests) == 10


async def test_fault_delay_and_abort_flags_di_fi() -> None:
    async with UpstreamServer(Reply(body=b"real")) as up:
        fault = FaultPolicy(delay=0.2, delay_fraction=1.0, abort_status=503, abort_fraction=1.0)
        async with running_dataplane(fault_snap(up.port, fault), fast_settings()) as p:
            r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
            assert r.status == 503 and 0.2 <= elapsed < 1.5
            assert r.header("x-envoy-overloaded") is None
            assert p.metrics.requests[-1].flags == "DI,FI"
            assert up.connections == 0


# --------------------------------------------------------------------------- mirror


async def test_mirror_gets_a_shadow_copy_with_the_same_body() -> None:
    async with (
        UpstreamServer(Reply(body=b"primary")) as up,
        UpstreamServer(Reply(body=b"mirror says hi")) as shadow,
    ):
        async with running_dataplane(mirror_snap(up.port, shadow.port), fast_settings()) as p:
            r = await request(p.host, p.port, get("/g"))
            assert (r.status, r.body) == (200, b"primary")
            body = bytes(range(256)) * 8
            raw = b"POST /p?q=1 HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%b" % (
                len(body),
                body,
            )
            r = await request(p.host, p.port, raw)
            assert (r.status, r.body) == (200, b"primary")
            assert await until(lambda: len(shadow.requests) == 2)
            g, post = shadow.requests
            assert (g.method, g.target, g.header("host")) == ("GET", "/g", "svc-shadow")
            assert (post.method, post.target) == ("POST", "/p?q=1")
            assert post.header("host") == "svc-shadow"
            assert post.body == body == up.requests[1].body
            assert post.header("x-request-id") == up.requests[1].header("x-request-id")


async def test_chunked_body_is_mirrored() -> None:
    async with UpstreamServer(Reply(body=b"primary")) as up, UpstreamServer() as shadow:
        async with running_dataplane(mirror_snap(up.port, shadow.port), fast_settings()) as p:
            raw = (
                b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            r = await request(p.host, p.port, raw)
            assert r.status == 200
            assert await until(lambda: len(shadow.requests) == 1)
            assert shadow.requests[0].body == b"hello world" == up.requests[0].body


async def test_slow_refusing_or_resetting_mirror_never_affects_the_primary() -> None:
    async with (
        UpstreamServer(Reply(body=b"primary")) as up,
        UpstreamServer(Reply(delay=5.0)) as slow,
        UpstreamServer(Reply(reset=True)) as resetting,
    ):
        for mirror_port in (slow.port, closed_port(), resetting.port):
            snap = mirror_snap(up.port, mirror_port)
            async with running_dataplane(snap, fast_settings()) as p:
                for _ in range(3):
                    r, elapsed = await timed(request(p.host, p.port, get(), timeout=5))
                    assert (r.status, r.body) == (200, b"primary")
                    assert elapsed < 1.0
                assert {(m.code, m.flags) for m in p.metrics.requests} == {(200, "-")}
        assert len(slow.requests) >= 1 and len(resetting.requests) >= 1


async def test_mirror_fraction_zero_sends_no_copy() -> None:
    async with UpstreamServer(Reply(body=b"primary")) as up, UpstreamServer() as shadow:
        snap = mirror_snap(up.port, shadow.port, fraction=0.0)
        async with running_dataplane(snap, fast_settings()) as p:
            for _ in range(5):
                r = await request(p.host, p.port, get())
                assert r.status == 200
            await asyncio.sleep(0.3)
            assert shadow.connections == 0 and shadow.raw_bytes == 0
