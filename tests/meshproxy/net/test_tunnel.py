"""TCP passthrough tunnels (meshproxy/net/tunnel.py) through a real data plane on loopback:
how they end (both half-closes, the idle timeout) and their flow control.

As in tests/meshproxy/test_proxy_origdst.py only the kernel's SO_ORIGINAL_DST answer is
simulated; sockets, listener and upstream are real. Every scenario runs on asyncio and uvloop
(their transports differ in EOF and flow-control details).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop

import meshproxy.proxy as proxy_mod
from meshproxy.settings import Settings
from tests.support.dataplane import running_dataplane
from tests.support.fakes import service_snapshot

TLS_HELLO = b"\x16\x03\x01\x00\x05hello"  # starts like a TLS ClientHello record
LOOPS = ["asyncio", "uvloop"]


def run_on(loop: str, scenario: Callable[[], Awaitable[None]]) -> None:
    if loop == "uvloop":
        uvloop.run(scenario())  # type: ignore[arg-type]
    else:
        asyncio.run(scenario())  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


class HalfCloser:
    """An upstream that never closes its socket by itself: ``first="server"`` sends b"bye"
    and half-closes, then reads to the client's EOF; ``first="client"`` reads to the client's
    EOF, then answers b"bye" and half-closes. Either way its socket then stays open (until the
    test ends), so only the two half-closes can end the tunnel."""

    def __init__(self, first: str) -> None:
        self.first = first
        self.got = b""
        self.done = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        if self.first == "server":
            w.write(b"bye")
            w.write_eof()
            self.got = await r.read()
        else:
            self.got = await r.read()
            w.write(b"bye")
            w.write_eof()
        self.done.set()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        for w in self.writers:
            w.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def redirect(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int] | None]:
    """``redirect[0]`` is what SO_ORIGINAL_DST reports for every accepted connection."""
    orig: list[tuple[str, int] | None] = [None]
    monkeypatch.setattr(proxy_mod, "original_dst", lambda sock: orig[0])
    return orig


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("first", ["client", "server"])
def test_both_half_closes_end_the_tunnel(
    redirect: list[tuple[str, int] | None], loop: str, first: str
) -> None:
    async def scenario() -> None:
        async with HalfCloser(first) as up_port:
            redirect[0] = ("127.0.0.1", up_port)
            async with running_dataplane(service_snapshot("svc", [1])) as p:
                reader, writer = await asyncio.open_connection(p.host, p.port)
                try:
                    writer.write(TLS_HELLO)
                    if first == "server":
                        assert await asyncio.wait_for(reader.read(), 5) == b"bye"
                        writer.write_eof()
                    else:
                        writer.write_eof()
                        assert await asyncio.wait_for(reader.read(), 5) == b"bye"
                    # the client keeps its socket open: only the two EOFs end the tunnel
                    assert await until(lambda: p.dp.active_connections == 0), p.dp
                    assert await p.dp.wait_no_connections(1.0)
                    assert p.dp._proxy is not None and not p.dp._proxy.tunnels
                finally:
                    writer.close()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stalled_tunnel_is_released_by_the_idle_timeout(
    redirect: list[tuple[str, int] | None], loop: str
) -> None:
    """A client that stops reading while the upstream still has bytes for it: nothing moves,
    so the idle timeout ends the tunnel, and it must release the connection although the
    proxy's write buffer towards that client can never drain (a flushing close would wait
    for it forever)."""

    async def scenario() -> None:
        async def flood(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await r.read(64)
                w.write(b"x" * (8 << 20))  # far more than the buffers on the way hold
                await w.drain()
                await r.read()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(flood, "127.0.0.1", 0)
        redirect[0] = ("127.0.0.1", server.sockets[0].getsockname()[1])
        settings = Settings(tcp_idle_timeout=0.4)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        try:
            async with running_dataplane(service_snapshot("svc", [1]), settings) as p:
                await asyncio.get_running_loop().sock_connect(client, (p.host, p.port))
                client.send(TLS_HELLO)  # and then never reads
                assert await until(lambda: p.dp.active_connections == 1)
                assert await until(lambda: p.dp.active_connections == 0, 6.0), p.dp
                assert p.dp._proxy is not None and not p.dp._proxy.tunnels
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_tunnel_is_closed_after_tcp_idle_timeout(
    redirect: list[tuple[str, int] | None], loop: str
) -> None:
    """Envoy's tcp_proxy idle_timeout: no byte either way for that long closes both sides;
    a tunnel that keeps moving bytes is left alone."""

    async def scenario() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
            finally:
                w.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        redirect[0] = ("127.0.0.1", server.sockets[0].getsockname()[1])
        settings = Settings(tcp_idle_timeout=0.4)
        try:
            async with running_dataplane(service_snapshot("svc", [1]), settings) as p:
                idle_r, idle_w = await asyncio.open_connection(p.host, p.port)
                busy_r, busy_w = await asyncio.open_connection(p.host, p.port)
                for w, r in ((idle_w, idle_r), (busy_w, busy_r)):
                    w.write(TLS_HELLO)
                    assert await r.readexactly(len(TLS_HELLO)) == TLS_HELLO
                t0 = time.monotonic()
                while time.monotonic() - t0 < 1.2:  # 3 timeouts: the busy one keeps talking
                    busy_w.write(b"\x00ping")
                    assert await busy_r.readexactly(5) == b"\x00ping"
                    await asyncio.sleep(0.05)
                assert await asyncio.wait_for(idle_r.read(), 2) == b""  # closed by the proxy
                assert p.dp.active_connections == 1
                busy_w.write(b"\x00more")
                assert await busy_r.readexactly(5) == b"\x00more"
                for w in (idle_w, busy_w):
                    w.close()
                assert await until(lambda: p.dp.active_connections == 0)
        finally:
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)


class Stalled:
    """An upstream with a tiny receive buffer that reads nothing until ``go`` is set, then
    everything to EOF (kept in :attr:`got`)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.got = bytearray()
        self.finished = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await self.go.wait()
        try:
            while data := await r.read(1 << 20):
                self.got += data
        finally:
            self.finished.set()
            w.close()

    async def __aenter__(self) -> Stalled:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepted ones
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)  # and a small MSS
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self.handle, sock=sock, limit=1 << 20)
        self.port = int(sock.getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


LIMIT = 64 << 20  # what the client tries to push while the upstream reads nothing


@pytest.mark.parametrize("loop", LOOPS)
def test_an_upstream_that_does_not_read_pauses_the_client(
    redirect: list[tuple[str, int] | None], loop: str
) -> None:
    """Back-pressure from the first byte: the client's first read (held while connecting) is
    more than the upstream takes, so the upstream pauses writing at once; the client must then
    stay paused (it used to be resumed right after the connect, and never paused again), so
    what the proxy buffers stays bounded whatever the client sends. Once the upstream reads,
    every byte arrives, in order.

    The client's first read is its whole first send up to the proxy's initial receive window
    (~128 KiB); the upstream's small MSS keeps the proxy's kernel send buffer small, so the
    held bytes overflow the upstream transport's high-water mark during the connect."""

    async def scenario() -> None:
        settings = Settings(high_water=16 * 1024, low_water=4 * 1024)
        aloop = asyncio.get_running_loop()
        async with Stalled() as up:
            redirect[0] = ("127.0.0.1", up.port)
            async with running_dataplane(service_snapshot("svc", [1]), settings) as p:
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                client.setblocking(False)
                await aloop.sock_connect(client, (p.host, p.port))
                data = memoryview(TLS_HELLO + bytes(range(251)) * (LIMIT // 251))
                sent = 0
                stalled = 0.0
                try:
                    while sent < len(data) and stalled < 0.5:
                        try:
                            sent += client.send(data[sent : sent + (1 << 20)])
                            stalled = 0.0
                        except BlockingIOError:
                            await asyncio.sleep(0.02)
                            stalled += 0.02
                    # kernel buffers (client's, proxy's) take some MiB; the proxy itself little
                    assert sent < len(data) // 2, f"the proxy took {sent} of {len(data)} bytes"
                    assert p.dp._proxy is not None
                    (tunnel,) = p.dp._proxy.tunnels
                    assert not tunnel.client.is_reading()  # the client side is paused
                    assert tunnel._up is not None
                    assert tunnel._up.get_write_buffer_size() <= 1 << 20
                    up.go.set()  # the upstream reads now: the rest flows
                    await aloop.sock_sendall(client, data[sent:])
                    client.shutdown(socket.SHUT_WR)
                    await asyncio.wait_for(up.finished.wait(), 30)
                    assert len(up.got) == len(data) and up.got == data  # nothing lost or reordered
                finally:
                    client.close()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_does_not_read_pauses_the_upstream(
    redirect: list[tuple[str, int] | None], loop: str
) -> None:
    """The other direction: the upstream sends much more than the client reads; the proxy
    stops reading the upstream (its own buffer stays bounded) until the client reads again."""

    async def scenario() -> None:
        data = bytes(range(251)) * (LIMIT // 251)
        pushed: list[int] = [0]

        async def talker(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readexactly(len(TLS_HELLO))
            view = memoryview(data)
            for i in range(0, len(view), 1 << 20):
                w.write(view[i : i + (1 << 20)])
                await w.drain()
                pushed[0] = i + (1 << 20)
            w.close()

        server = await asyncio.start_server(talker, "127.0.0.1", 0)
        redirect[0] = ("127.0.0.1", server.sockets[0].getsockname()[1])
        settings = Settings(high_water=16 * 1024, low_water=4 * 1024)
        try:
            async with running_dataplane(service_snapshot("svc", [1]), settings) as p:
                reader, writer = await asyncio.open_connection(p.host, p.port, limit=1 << 20)
                writer.write(TLS_HELLO)
                await asyncio.sleep(0.5)  # the client reads nothing meanwhile
                assert pushed[0] < len(data) // 2, f"the upstream pushed {pushed[0]} bytes"
                assert p.dp._proxy is not None
                (tunnel,) = p.dp._proxy.tunnels
                assert tunnel._up is not None and not tunnel._up.is_reading()
                assert tunnel.client.get_write_buffer_size() <= 1 << 20
                got = await asyncio.wait_for(reader.readexactly(len(data)), 30)
                assert got == data
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)
