"""A real HTTP/1.1 upstream for tests: asyncio + httptools on 127.0.0.1:0, recording everything.

Theory of operation
-------------------
:class:`UpstreamServer` listens on an OS-chosen port. Every request it parses is recorded as a
:class:`Recorded` (method, target, version, headers with lower-case names, body, and the id of
the connection it came on), and answered with the :class:`Reply` that ``handler`` returns for it
(or a fixed ``Reply``). A reply can be Content-Length framed, chunked (``chunks``),
close-delimited (no length, connection closed after the body), delayed, a reset / silent
close before any byte, or exact raw bytes (then a close, a reset, or nothing).
``connections`` counts accepted TCP connections and ``raw_bytes`` every byte received, so a
test can assert that nothing at all reached the upstream.

Usage::

    async with UpstreamServer(Reply(body=b"hi")) as up:
        ... up.port ... up.requests[0].header("x-request-id") ...
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools


@dataclass
class Recorded:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    conn_id: int

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (case-insensitive), or None."""
        name = name.lower()
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    @property
    def path(self) -> str:
        return self.target


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b"ok"
    chunks: list[bytes] | None = None  # chunked transfer encoding with these chunks
    close_delimited: bool = False  # no length; close the connection after the body
    delay: float = 0.0  # seconds before the response head
    chunk_delay: float = 0.0  # seconds between chunks
    close: bool = False  # send Connection: close and close after the response
    reset: bool = False  # abort the connection instead of answering
    silent_close: bool = False  # close (FIN) instead of answering
    reason: str = "OK"
    no_content_length: bool = False  # omit content-length (e.g. for 204/304)
    interim_100: bool = False  # send "100 Continue" before the final response
    raw: bytes | None = None  # send exactly these bytes instead of a response, then close
    raw_keep: bool = False  # with ``raw``: keep the connection open (and answering) after it
    raw_reset: bool = False  # with ``raw``: end with a reset (RST) instead of a close (FIN)


Handler = Callable[[Recorded], Reply]


class _Conn(asyncio.Protocol):
    def __init__(self, server: UpstreamServer, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[tuple[str, str]] = []
        self.url = b""
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[Recorded | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        self.server._conns.add(self)
        self.task = asyncio.get_running_loop().create_task(self._respond_loop())

    def data_received(self, data: bytes) -> None:
        self.server.raw_bytes += len(data)
        self.server.raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.server.parse_errors += 1
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        self.queue.put_nowait(None)

    def on_message_begin(self) -> None:
        self.headers = []
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        rec = Recorded(
            method=self.parser.get_method().decode(),
            target=self.url.decode("latin-1"),
            version=self.parser.get_http_version(),
            headers=self.headers,
            body=b"".join(self.body),
            conn_id=self.conn_id,
        )
        self.server.requests.append(rec)
        self.queue.put_nowait(rec)

    async def _respond_loop(self) -> None:
        while True:
            rec = await self.queue.get()
            if rec is None or self.transport is None or self.transport.is_closing():
                return
            h = self.server.handler
            reply = h(rec) if callable(h) else h
            if reply.delay:
                await asyncio.sleep(reply.delay)
            t = self.transport
            if t.is_closing():
                return
            if reply.reset:
                t.abort()
                return
            if reply.silent_close:
                t.close()
                return
            if reply.raw is not None:
                t.write(reply.raw)
                if reply.raw_keep:
                    continue
                if reply.raw_reset:
                    await asyncio.sleep(0.05)  # the bytes leave before the reset
                    sock = t.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    t.abort()
                    return
                t.close()
                return
            if reply.interim_100:
                t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            lines = [f"HTTP/1.1 {reply.status} {reply.reason}\r\n"]
            for n, v in reply.headers:
                lines.append(f"{n}: {v}\r\n")
            if reply.chunks is not None:
                lines.append("Transfer-Encoding: chunked\r\n")
            elif not reply.close_delimited and not reply.no_content_length:
                lines.append(f"Content-Length: {len(reply.body)}\r\n")
            if reply.close or reply.close_delimited:
                lines.append("Connection: close\r\n")
            lines.append("\r\n")
            t.write("".join(lines).encode("latin-1"))
            no_body = rec.method == "HEAD" or reply.status in (204, 304)
            if reply.chunks is not None and not no_body:
                for c in reply.chunks:
                    if reply.chunk_delay:
                        await asyncio.sleep(reply.chunk_delay)
                    if t.is_closing():
                        return
                    t.write(b"%x\r\n%b\r\n" % (len(c), c))
                t.write(b"0\r\n\r\n")
            elif not no_body:
                t.write(reply.body)
            if reply.close or reply.close_delimited:
                t.close()
                return


class UpstreamServer:
    """An HTTP/1.1 server on 127.0.0.1 with an OS-chosen port that records every request."""

    def __init__(self, handler: Handler | Reply | None = None, host: str = "127.0.0.1") -> None:
        self.handler: Handler | Reply = handler if handler is not None else Reply()
        self.host = host
        self.port = 0
        self.requests: list[Recorded] = []
        self.connections = 0
        self.raw_bytes = 0
        self.raw: list[bytes] = []
        self.parse_errors = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._next_id = 0

    def _factory(self) -> _Conn:
        self._next_id += 1
        return _Conn(self, self._next_id)

    async def start(self) -> UpstreamServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()
            if c.task is not None:
                c.task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> UpstreamServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
