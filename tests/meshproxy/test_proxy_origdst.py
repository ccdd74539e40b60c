"""The outbound listener's original-destination fallback, on real loopback sockets.

Only the kernel's answer is simulated: ``meshproxy.proxy.original_dst`` (the SO_ORIGINAL_DST
read) is replaced by a function returning what iptables would have reported, so the routing
fallback, the passthrough pools, REGISTRY_ONLY and the once-per-connection read are tested
without root. tests/integration/test_capture_netns.py does the same with real iptables.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest

import meshproxy.proxy as proxy_mod
from meshproxy.config.model import RouteTable, Snapshot
from meshproxy.settings import Settings
from tests.support.dataplane import running_dataplane
from tests.support.fakes import service_snapshot
from tests.support.rawhttp import get, read_response, request
from tests.support.upstream import Reply, UpstreamServer


class Kernel:
    """Stands in for SO_ORIGINAL_DST: every accepted connection 'was redirected' from
    ``orig`` (None: not redirected); counts the reads."""

    def __init__(self) -> None:
        self.orig: tuple[str, int] | None = None
        self.reads = 0

    def __call__(self, sock: object) -> tuple[str, int] | None:
        assert sock is not None  # the connection's real socket is what gets asked
        self.reads += 1
        return self.orig


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernel]:
    k = Kernel()
    monkeypatch.setattr(proxy_mod, "original_dst", k)
    yield k


def with_vip(port: int, vip: str = "10.96.0.10", service_port: int = 80) -> Snapshot:
    """Service ``svc`` (endpoint 127.0.0.1:port) whose ServiceEntry ``addresses`` hold ``vip``."""
    snap = service_snapshot("svc", [port])
    table = dataclasses.replace(snap.routes, addresses={vip: {service_port: "svc"}})
    return dataclasses.replace(snap, routes=table)


async def test_routed_requests_never_read_the_original_destination(kernel: Kernel) -> None:
    kernel.orig = ("10.96.0.10", 80)
    async with UpstreamServer(Reply(body=b"svc")) as up:
        async with running_dataplane(with_vip(up.port)) as p:
            for _ in range(3):
                r = await request(p.host, p.port, get("/", host="svc"))
                assert r.status == 200 and r.body == b"svc"
    assert kernel.reads == 0


async def test_not_redirected_unknown_host_is_404_nr(kernel: Kernel) -> None:
    async with UpstreamServer(Reply(body=b"svc")) as up:
        async with running_dataplane(with_vip(up.port)) as p:
            r = await request(p.host, p.port, get("/", host="10.96.0.10"))
            assert r.status == 404
            assert [(m.cluster, m.code, m.flags) for m in p.metrics.requests] == [(None, 404, "NR")]
            assert len(up.requests) == 0
    assert kernel.reads == 1


async def test_service_entry_address_routes_to_the_service(kernel: Kernel) -> None:
    kernel.orig = ("10.96.0.10", 80)
    async with UpstreamServer(Reply(body=b"svc")) as up:
        async with running_dataplane(with_vip(up.port)) as p:
            r = await request(p.host, p.port, get("/x", host="10.96.0.10"))
            assert r.status == 200 and r.body == b"svc"
            assert up.requests[0].header("host") == "10.96.0.10"  # the Host is kept
            assert up.requests[0].header("x-envoy-attempt-count") == "1"
            assert p.metrics.requests[-1].cluster == "svc"
            # another port of the VIP is not the service's: passthrough to it (ALLOW_ANY)
            kernel.orig = ("127.0.0.1", up.port)
            r = await request(p.host, p.port, get("/y", host="10.96.0.10"))
            assert r.status == 200
            assert p.metrics.requests[-1].cluster == "PassthroughCluster"


async def test_allow_any_passthrough_reads_once_per_connection_and_pools(kernel: Kernel) -> None:
    async with UpstreamServer(Reply(body=b"elsewhere")) as other:
        kernel.orig = ("127.0.0.1", other.port)
        async with running_dataplane(service_snapshot("svc", [1])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            try:
                for i in range(3):
                    writer.write(get(f"/p{i}", host="unknown.example"))
                    r = await read_response(reader)
                    assert r.status == 200 and r.body == b"elsewhere"
            finally:
                writer.close()
            assert kernel.reads == 1  # once for the connection, not per request
            r = await request(p.host, p.port, get("/again", host="unknown.example"))
            assert r.status == 200
            assert kernel.reads == 2
            assert other.connections == 1  # one pooled keep-alive upstream connection
            assert [m.cluster for m in p.metrics.requests] == ["PassthroughCluster"] * 4
            assert p.metrics.opened == {"PassthroughCluster": 1}
            # a config swap drops the passthrough pools (like any cluster it does not name)
            p.state.apply(service_snapshot("svc", [1], version="v2"))
            r = await request(p.host, p.port, get("/after", host="unknown.example"))
            assert r.status == 200 and other.connections == 2


async def test_registry_only_answers_502_blackhole(kernel: Kernel) -> None:
    async with UpstreamServer(Reply(body=b"elsewhere")) as other:
        kernel.orig = ("127.0.0.1", other.port)
        settings = Settings(outbound_traffic_policy="REGISTRY_ONLY")
        async with running_dataplane(with_vip(other.port), settings) as p:
            r = await request(p.host, p.port, get("/", host="unknown.example"))
            assert r.status == 502 and r.body == b""
            assert [(m.cluster, m.code, m.flags) for m in p.metrics.requests] == [
                ("BlackHoleCluster", 502, "NR")
            ]
            assert len(other.requests) == 0
            # a ServiceEntry address still routes under REGISTRY_ONLY
            kernel.orig = ("10.96.0.10", 80)
            r = await request(p.host, p.port, get("/", host="10.96.0.10"))
            assert r.status == 200 and p.metrics.requests[-1].cluster == "svc"


def test_address_table_defaults_are_empty() -> None:
    assert RouteTable().addresses == {} and RouteTable().address_ranges == ()


async def test_each_destination_has_its_own_pool_under_one_cluster_name(kernel: Kernel) -> None:
    async with UpstreamServer(Reply(body=b"a")) as a, UpstreamServer(Reply(body=b"b")) as b:
        async with running_dataplane(service_snapshot("svc", [1])) as p:
            for up, body in ((a, b"a"), (b, b"b"), (a, b"a")):
                kernel.orig = ("127.0.0.1", up.port)
                r = await request(p.host, p.port, get("/", host="unknown.example"))
                assert r.status == 200 and r.body == body
                assert p.metrics.requests[-1].cluster == "PassthroughCluster"
            assert (a.connections, b.connections) == (1, 1)  # a's connection was reused
            assert p.metrics.opened == {"PassthroughCluster": 2}
            states = p.dp._pools.states()
            assert sorted(k for k in states if k.startswith("PassthroughCluster|")) == sorted(
                f"PassthroughCluster|127.0.0.1:{up.port}" for up in (a, b)
            )


# --------------------------------------------------------------------------- TCP passthrough

TLS_HELLO = b"\x16\x03\x01\x00\x05hello"  # starts like a TLS ClientHello record


async def _echo_server() -> tuple[asyncio.Server, list[bytes]]:
    """Echoes every read; at the client's EOF writes b"|eof" and closes."""
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                got.append(data)
                w.write(data)
            w.write(b"|eof")
            await w.drain()
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), got


async def test_non_http_redirected_connection_is_tunnelled(kernel: Kernel) -> None:
    echo, got = await _echo_server()
    kernel.orig = ("127.0.0.1", echo.sockets[0].getsockname()[1])
    try:
        async with running_dataplane(service_snapshot("svc", [1])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(TLS_HELLO)
            assert await reader.readexactly(len(TLS_HELLO)) == TLS_HELLO
            big = bytes(range(256)) * 4096  # 1 MiB: flow control both ways
            writer.write(big)
            assert await reader.readexactly(len(big)) == big
            writer.write_eof()  # half-close reaches the server, its answer still comes back
            assert await asyncio.wait_for(reader.read(), 5) == b"|eof"
            writer.close()
            assert b"".join(got) == TLS_HELLO + big
            assert p.metrics.requests == []  # no HTTP request was made of it
    finally:
        echo.close()
        await echo.wait_closed()


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def test_h2_prior_knowledge_redirected_is_tunnelled(kernel: Kernel) -> None:
    """Plaintext gRPC / h2c starts with an upper-case preface; it is not HTTP/1.1, so a
    redirected connection carrying it goes to its original destination byte for byte."""
    echo, got = await _echo_server()
    kernel.orig = ("127.0.0.1", echo.sockets[0].getsockname()[1])
    try:
        async with running_dataplane(service_snapshot("svc", [1])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(H2_PREFACE)
            assert await asyncio.wait_for(reader.readexactly(len(H2_PREFACE)), 5) == H2_PREFACE
            writer.close()
            assert b"".join(got) == H2_PREFACE
            assert p.metrics.requests == []
    finally:
        echo.close()
        await echo.wait_closed()


def test_h2_preface_prefixes() -> None:
    assert proxy_mod._is_h2_preface(H2_PREFACE)
    assert proxy_mod._is_h2_preface(b"PRI")  # a first read cut short still counts
    assert not proxy_mod._is_h2_preface(b"P")  # ... but not before it could be told from POST
    assert not proxy_mod._is_h2_preface(b"PR")
    assert not proxy_mod._is_h2_preface(b"PRINT / HTTP/1.1\r\n")
    assert not proxy_mod._is_h2_preface(b"POST / HTTP/1.1\r\n")


async def test_non_http_not_redirected_is_a_bad_request(kernel: Kernel) -> None:
    async with running_dataplane(service_snapshot("svc", [1])) as p:
        r = await request(p.host, p.port, TLS_HELLO)
        assert r.status == 400


async def test_tunnel_to_a_closed_port_closes_the_client(kernel: Kernel) -> None:
    echo, _ = await _echo_server()
    kernel.orig = ("127.0.0.1", echo.sockets[0].getsockname()[1])
    echo.close()
    await echo.wait_closed()  # nothing listens there any more
    async with running_dataplane(service_snapshot("svc", [1])) as p:
        reader, writer = await asyncio.open_connection(p.host, p.port)
        writer.write(TLS_HELLO)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_registry_only_tunnels_service_entry_addresses_only(kernel: Kernel) -> None:
    echo, _ = await _echo_server()
    echo_port = echo.sockets[0].getsockname()[1]
    settings = Settings(outbound_traffic_policy="REGISTRY_ONLY")
    try:
        async with running_dataplane(with_vip(1, "127.0.0.1", echo_port), settings) as p:
            kernel.orig = ("127.0.0.1", echo_port)  # a ServiceEntry address and port: tunnelled
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(TLS_HELLO)
            assert await reader.readexactly(len(TLS_HELLO)) == TLS_HELLO
            writer.close()
            kernel.orig = ("127.0.0.2", echo_port)  # unknown: closed without a byte
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(TLS_HELLO)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
    finally:
        echo.close()
        await echo.wait_closed()


def test_under_uvloop_later_reads_are_http_body_not_first_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop caches the protocol's bound ``data_received``: after the first bytes made the
    connection HTTP, a body piece that starts like TLS must still be body (the transport is
    re-bound to the new class's method, and a stale call is passed on)."""
    import uvloop

    kernel = Kernel()
    monkeypatch.setattr(proxy_mod, "original_dst", kernel)
    bodies: list[bytes] = []

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                bodies.append(await r.readexactly(length))
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def scenario() -> None:
        up = await asyncio.start_server(upstream, "127.0.0.1", 0)
        kernel.orig = ("127.0.0.1", up.sockets[0].getsockname()[1])
        try:
            async with running_dataplane(service_snapshot("svc", [1])) as p:
                reader, writer = await asyncio.open_connection(p.host, p.port)
                body = b"\x16\x03\x01 binary body"
                writer.write(
                    b"POST /up HTTP/1.1\r\nHost: unknown.example\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body)
                )
                await writer.drain()
                await asyncio.sleep(0.05)  # the body arrives in a read of its own
                writer.write(body)
                r = await read_response(reader)
                assert r.status == 200 and r.body == b"ok"
                writer.write(get("/second", host="unknown.example"))
                r = await read_response(reader)
                assert r.status == 200
                writer.close()
        finally:
            up.close()
            await up.wait_closed()
        assert bodies == [body, b""]
        assert kernel.reads == 1

    uvloop.run(scenario())


async def test_the_outbound_policy_cannot_be_left_out() -> None:
    """An outbound connection always knows its ProxyContext (REGISTRY_ONLY is read from it):
    there is no way to build one that would tunnel without the check."""
    from meshproxy.http.server import ServerContext
    from meshproxy.proxy import OutboundConnection
    from tests.support.fakes import FakeMetrics

    ctx = ServerContext(Settings(), FakeMetrics(), lambda conn, head: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        OutboundConnection(ctx)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        OutboundConnection(ctx, None)  # type: ignore[arg-type]
