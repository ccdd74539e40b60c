"""TCP passthrough tunnels (meshproxy/net/tunnel.py) through a real data plane on loopback:
how they end (both half-closes, the idle timeout) and their flow control.

As in tests/meshproxy/test_proxy_origdst.py only the kernel's SO_ORIGINAL_DST answer is
simulated; sockets, listener and upstream are real. Every scenario runs on asyncio and uvloop
(their transports differ in EOF and flow-control details).
"""

from __future__ import annotations

import asyncio
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
