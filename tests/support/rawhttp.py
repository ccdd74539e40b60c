"""Byte-exact HTTP/1.x client helpers for tests (asyncio streams on purpose: tests only).

:func:`read_response` reads one response off a ``StreamReader`` the way a strict client would:
status line, headers (names lower-cased, order kept), then the body by the framing the head
declares (no body for HEAD / 1xx / 204 / 304, Content-Length, chunked, else until EOF). It
returns the raw bytes too, so tests can assert on exact framing. :func:`get` builds the plain
GET request most proxy tests send.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


def get(path: str = "/", host: str = "svc", extra: str = "", version: str = "1.1") -> bytes:
    """A GET request head: ``extra`` is more header lines, each ending in CRLF."""
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    raw_head: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def has(self, name: str) -> bool:
        return self.header(name) is not None


async def read_response(
    reader: asyncio.StreamReader, *, head_request: bool = False, timeout: float = 5.0
) -> Response:
    async with asyncio.timeout(timeout):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        resp = Response(version=version, status=int(code), reason=reason, raw_head=raw)
        for ln in lines[1:]:
            n, _, v = ln.partition(":")
            resp.headers.append((n.strip().lower(), v.strip()))
        if head_request or resp.status < 200 or resp.status in (204, 304):
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None and "chunked" in te.lower():
            resp.chunked = True
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    # trailers until an empty line
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            resp.body = b"".join(parts)
        elif cl is not None:
            resp.body = await reader.readexactly(int(cl))
        else:
            resp.body = await reader.read()
        return resp


async def request(
    host: str,
    port: int,
    raw: bytes,
    *,
    head_request: bool = False,
    timeout: float = 5.0,
) -> Response:
    """Send ``raw`` on a new connection, read one response, close."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        return await read_response(reader, head_request=head_request, timeout=timeout)
    finally:
        writer.close()


async def is_closed(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True if the peer closes (EOF or reset) within ``timeout`` without sending more bytes."""
    try:
        async with asyncio.timeout(timeout):
            data = await reader.read(1)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return data == b""
