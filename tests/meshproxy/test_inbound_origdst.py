"""The inbound listener with transparent capture: a redirected connection goes to
``127.0.0.1:<original port>``, with that port's policies; others go to ``--app``.

The kernel's answer (``SO_ORIGINAL_DST``) is simulated by replacing
``meshproxy.inbound.original_dst``; sockets, listener, pools and applications are real (loopback).
tests/integration/test_capture_netns.py does it with real iptables in network namespaces.
"""

from __future__ import annotations

import asyncio
import socket
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import meshproxy.inbound as inbound_mod
from control.istio import build_snapshot
from meshproxy.config.model import ProxyIdentity, Snapshot
from meshproxy.dataplane import DataPlane
from meshproxy.metrics import Metrics
from meshproxy.settings import Settings
from meshproxy.state import State
from tests.support.rawhttp import get, read_response, request

WORKLOAD = ProxyIdentity(namespace="shop", labels={"app": "web"})


async def _app(name: bytes) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(name), name))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@asynccontextmanager
async def sidecar(snap: Snapshot, app_port: int) -> AsyncIterator[tuple[DataPlane, int]]:
    state = State()
    state.apply(snap)
    dp = DataPlane(state, Metrics(WORKLOAD), Settings())
    _, port = await dp.start_inbound("127.0.0.1", 0, ("127.0.0.1", app_port), WORKLOAD)
    try:
        yield dp, port
    finally:
        await dp.close()


def _snapshot(tmp_path: Path, text: str = "") -> Snapshot:
    (tmp_path / "mesh.yaml").write_text(textwrap.dedent(text))
    snap, report = build_snapshot([str(tmp_path)], WORKLOAD)
    assert snap is not None, report.problems
    return snap


@pytest.mark.parametrize("redirected", [False, True])
async def test_redirected_connection_goes_to_its_original_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redirected: bool
) -> None:
    main, other = await _app(b"main"), await _app(b"other")
    main_port = main.sockets[0].getsockname()[1]
    other_port = other.sockets[0].getsockname()[1]
    reads: list[object] = []

    def fake_original_dst(sock: object) -> tuple[str, int] | None:
        reads.append(sock)
        return ("10.1.2.3", other_port) if redirected else None

    monkeypatch.setattr(inbound_mod, "original_dst", fake_original_dst)
    try:
        async with sidecar(_snapshot(tmp_path), main_port) as (_, port):
            for _ in range(2):
                r = await request("127.0.0.1", port, get("/", host="web"))
                assert r.status == 200
                assert r.body == (b"other" if redirected else b"main")
            assert len(reads) == 2  # one read per accepted connection
    finally:
        for s in (main, other):
            s.close()
            await s.wait_closed()


async def test_the_original_port_decides_authorization(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AuthorizationPolicy ``to.operation.ports`` sees the port the client connected to."""
    main, other = await _app(b"main"), await _app(b"other")
    main_port = main.sockets[0].getsockname()[1]
    other_port = other.sockets[0].getsockname()[1]
    orig: list[tuple[str, int] | None] = [None]
    monkeypatch.setattr(inbound_mod, "original_dst", lambda sock: orig[0])
    snap = _snapshot(
        tmp_path,
        f"""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: no-admin-port, namespace: shop}}
        spec:
          selector: {{matchLabels: {{app: web}}}}
          action: DENY
          rules: [{{to: [{{operation: {{ports: ["{other_port}"]}}}}]}}]
        """,
    )
    try:
        async with sidecar(snap, main_port) as (_, port):
            r = await request("127.0.0.1", port, get("/", host="web"))
            assert r.status == 200 and r.body == b"main"
            orig[0] = ("10.1.2.3", other_port)
            r = await request("127.0.0.1", port, get("/", host="web"))
            assert r.status == 403
            orig[0] = ("10.1.2.3", main_port)  # redirected to --app's own port: allowed
            r = await request("127.0.0.1", port, get("/", host="web"))
            assert r.status == 200 and r.body == b"main"
    finally:
        for s in (main, other):
            s.close()
            await s.wait_closed()


async def _counting_server(port: int) -> tuple[asyncio.Server | None, list[int]]:
    """A listener on 127.0.0.1:``port`` counting what reaches it (None if the port is taken)."""
    seen: list[int] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(1)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nadmin")
        await w.drain()
        w.close()

    try:
        return await asyncio.start_server(handle, "127.0.0.1", port), seen
    except OSError:
        return None, seen


async def test_redirected_connections_to_the_proxys_own_ports_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Istio's reserved proxy ports (admin 15000, outbound 15001...) and the ports this process
    listens on are never served from the pod IP: a redirected connection to one is closed
    (counted, logged once), not forwarded to 127.0.0.1:<port>."""
    main = await _app(b"main")
    main_port = main.sockets[0].getsockname()[1]
    orig: list[tuple[str, int] | None] = [None]
    monkeypatch.setattr(inbound_mod, "original_dst", lambda sock: orig[0])
    stand_ins = [await _counting_server(p) for p in (15000, 15001)]
    try:
        async with sidecar(_snapshot(tmp_path), main_port) as (dp, port):
            _, out_port = await dp.start_outbound("127.0.0.1", 0)
            targets = [15000, 15001, port, out_port]
            for n, target in enumerate(targets, 1):
                orig[0] = ("10.1.2.3", target)
                with caplog.at_level("DEBUG", logger="meshproxy.inbound"):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(get("/", host="web"))
                    try:
                        got = await asyncio.wait_for(reader.read(), 5)
                    except ConnectionResetError:
                        got = b""
                    writer.close()
                assert got == b"", (target, got)
                assert dp.inbound_listener is not None
                assert dp.inbound_listener.refused_proxy_port == n
            assert sum("proxy's own port" in r.getMessage() for r in caplog.records) == 1
            assert dp.active_connections == 0
            view = dp.inbound_view()
            assert view is not None and view["refused_proxy_port"] == len(targets)
            orig[0] = ("10.1.2.3", main_port)  # an application port still works
            r = await request("127.0.0.1", port, get("/", host="web"))
            assert r.status == 200 and r.body == b"main"
        for _, seen in stand_ins:
            assert seen == []  # never forwarded to the admin / outbound port
    finally:
        for server, _ in stand_ins:
            if server is not None:
                server.close()
                await server.wait_closed()
        main.close()
        await main.wait_closed()


async def test_the_per_port_table_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peers connecting to ever new ports never grow the per-port contexts (and their pool
    states) past ``Settings.max_inbound_ports``: the least recently used idle one is evicted
    (its pool dropped); with every slot busy a new port is refused (closed, counted); a port
    in use keeps working throughout."""
    main, other = await _app(b"main"), await _app(b"other")
    main_port = main.sockets[0].getsockname()[1]
    other_port = other.sockets[0].getsockname()[1]
    orig: list[tuple[str, int] | None] = [None]
    monkeypatch.setattr(inbound_mod, "original_dst", lambda sock: orig[0])
    cap = 4
    state = State()
    state.apply(_snapshot(tmp_path))
    dp = DataPlane(state, Metrics(WORKLOAD), Settings(max_inbound_ports=cap))
    _, port = await dp.start_inbound("127.0.0.1", 0, ("127.0.0.1", main_port), WORKLOAD)
    free = []  # ports nothing listens on: a 503 each, but each makes a context and a pool
    for _ in range(3 * cap):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        free.append(s)
    try:
        assert dp._inbound is not None and dp._inbound_pools is not None
        # a keep-alive connection to a legit port stays open throughout
        orig[0] = ("10.1.2.3", other_port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/", host="web"))
        assert (await read_response(reader)).body == b"other"
        for s in free:
            orig[0] = ("10.1.2.3", s.getsockname()[1])
            r = await request("127.0.0.1", port, get("/", host="web"))
            assert r.status == 503
            assert len(dp._inbound._ports) <= cap
            clusters = [k for k in dp._inbound_pools.states() if k.startswith("inbound|")]
            assert len(clusters) <= cap + 1, clusters  # + --app's own
        assert other_port in dp._inbound._ports  # busy: never evicted
        writer.write(get("/", host="web"))  # the busy port still answers on its connection
        assert (await read_response(reader)).body == b"other"
        # every slot busy: a new port is refused, not added
        held = []
        for s in free[: cap - 1]:
            orig[0] = ("10.1.2.3", s.getsockname()[1])
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.1)
        orig[0] = ("10.1.2.3", free[-1].getsockname()[1])
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(get("/", host="web"))
        assert await asyncio.wait_for(r2.read(), 5) == b""
        w2.close()
        assert dp.inbound_listener is not None and dp.inbound_listener.refused_port_limit == 1
        assert len(dp._inbound._ports) == cap
        for _, w in held:
            w.close()
        writer.close()
        await asyncio.sleep(0.1)
        assert all(c.users == 0 for c in dp._inbound._ports.values())
        # slots free again: a new port is served
        orig[0] = ("10.1.2.3", main_port)
        r = await request("127.0.0.1", port, get("/", host="web"))
        assert r.status == 200 and r.body == b"main"
        orig[0] = ("10.1.2.3", other_port)
        r = await request("127.0.0.1", port, get("/", host="web"))
        assert r.status == 200 and r.body == b"other"
    finally:
        await dp.close()
        for s in free:
            s.close()
        for srv in (main, other):
            srv.close()
            await srv.wait_closed()


@pytest.mark.parametrize("ending", ["silent", "eof", "tls-without-identity", "served"])
async def test_every_ending_releases_the_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """However a redirected connection ends (first-byte timeout, EOF before a byte, TLS with
    no workload certificate, a served request), its context is free for eviction after."""
    other = await _app(b"other")
    other_port = other.sockets[0].getsockname()[1]
    monkeypatch.setattr(inbound_mod, "original_dst", lambda sock: ("10.1.2.3", other_port))
    state = State()
    state.apply(_snapshot(tmp_path))
    dp = DataPlane(state, Metrics(WORKLOAD), Settings(first_byte_timeout=0.2))
    _, port = await dp.start_inbound("127.0.0.1", 0, ("127.0.0.1", 1), WORKLOAD)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if ending == "eof":
            writer.write_eof()
        elif ending == "tls-without-identity":
            writer.write(b"\x16\x03\x01\x00\x05hello")
        elif ending == "served":
            writer.write(get("/", host="web"))
            assert (await read_response(reader)).body == b"other"
            writer.close()
        assert dp._inbound is not None
        ctx = dp._inbound._ports[other_port]
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:  # closed with the client's bytes unread
            pass
        writer.close()
        for _ in range(100):
            if ctx.users == 0:
                break
            await asyncio.sleep(0.01)
        assert ctx.users == 0
    finally:
        await dp.close()
        other.close()
        await other.wait_closed()
