"""The floor: a bare uvloop + httptools HTTP/1.1 keep-alive forwarder (not collected by pytest).

Theory of operation
-------------------
This is the least Python a proxy of meshproxy's shape can run per request, so its CPU per
request on a given machine is the floor meshproxy's figure is compared with (``probe.py --peer
bare``). One client connection parses requests with ``httptools.HttpRequestParser``; each
request head is re-serialized (headers copied, nothing routed, no metrics) and written to one
pooled keep-alive upstream connection, whose ``httptools.HttpResponseParser`` feeds the response
back: the head re-serialized with ``content-length``, the body appended, one write per upstream
read. No pipelining, no chunked bodies, no timeouts: it is a measuring stick, not a proxy.

Usage::

    python tests/perf/bare_forwarder.py UPSTREAM_PORT   # prints "listening PORT" on stdout
"""

from __future__ import annotations

import asyncio
import socket
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """One keep-alive upstream connection, bound to one client request at a time."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.out: list[bytes] = []
        self.headers: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.out and self.client is not None:
            self.client.write(b"".join(self.out))
            self.out = []
        c = self.client
        if c is not None and c.done:
            self.client = None
            c.done = False
            self.pool.append(self)
            c.next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.lower()
        if n not in (b"connection", b"keep-alive", b"transfer-encoding", b"content-length"):
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.out.append(b"HTTP/1.1 %d OK\r\n" % status)
        self.out += self.headers

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.out[1 + len(self.headers) :])
        del self.out[1 + len(self.headers) :]
        self.out.append(b"content-length: %d\r\n\r\n" % len(body))
        self.out.append(body)
        if self.client is not None:
            self.client.done = True


class Client(asyncio.Protocol):
    """One client connection: parse a request, forward it, answer in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, up_port: int, pool: list[Upstream]):
        self.loop = loop
        self.up_port = up_port
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[bytes] = []
        self.pending: list[bytes] = []
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"connection", b"keep-alive"):
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        req = b"%s %s HTTP/1.1\r\n%s\r\n" % (method, self.url, b"".join(self.headers))
        self.pending.append(req)
        if len(self.pending) == 1:
            self.next_send()

    def next(self) -> None:
        self.pending.pop(0)
        if self.pending:
            self.next_send()

    def next_send(self) -> None:
        req = self.pending[0]
        if self.pool:
            up = self.pool.pop()
            up.client = self
            up.transport.write(req)  # type: ignore[union-attr]
        else:
            self.loop.create_task(self.connect(req))

    async def connect(self, req: bytes) -> None:
        _, up = await self.loop.create_connection(
            lambda: Upstream(self.pool), "127.0.0.1", self.up_port
        )
        up.client = self
        up.transport.write(req)  # type: ignore[union-attr]


async def main(up_port: int) -> None:
    loop = asyncio.get_running_loop()
    pool: list[Upstream] = []
    server = await loop.create_server(lambda: Client(loop, up_port, pool), "127.0.0.1", 0)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
