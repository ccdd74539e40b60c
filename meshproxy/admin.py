"""The admin HTTP API: readiness, config dump, clusters, stats, drain, quit.

Theory of operation
-------------------
:class:`Admin` only speaks HTTP; what the answers contain comes from an :class:`AdminBackend`:
:class:`meshproxy.app.Proxy` in a single process, :class:`meshproxy.workers.Supervisor` with
``--workers N`` (which fetches from its workers' private admin ports with :func:`fetch` and
merges). Endpoints:

* ``GET /ready`` -> 200 once listeners are up and a config is applied, 503 before and while
  draining.
* ``GET /config_dump`` -> JSON: ``version``, ``last_error``, listeners, virtual hosts with their
  routes and clusters, each with the Istio resource it came from (see :func:`snapshot_dump`).
* ``GET /clusters`` -> the data plane's live cluster view.
* ``GET /stats/prometheus`` -> Prometheus text; ``GET /stats`` -> the same samples without
  comments, or the raw mergeable export with ``?format=json`` (used by the supervisor).
* ``POST /drain`` -> 200 and a graceful drain starts; ``POST /quitquitquit`` -> 200, then drain
  and exit 0.

The server is the project's own: one :class:`_AdminConnection` (``asyncio.Protocol`` +
``httptools``) per client, one request per connection (the answer carries
``Connection: close``), the head bounded in size and read under a deadline, the body of a POST
read and ignored (bounded too). ``GET`` routes answer ``HEAD``; a known path with another
method is ``405`` with ``Allow``; an unknown path ``404``. It replaces aiohttp, whose import
alone cost every worker process ~14 MiB of RSS; ``prometheus_client`` (for its content-type
constant) is imported at the first scrape only.

:func:`to_jsonable` serialises the frozen config dataclasses generically (enums by value,
compiled regexes by pattern, mappings as objects, tuples as lists, ``Meta`` via ``as_dict``), so
new model fields show up in ``/config_dump`` without touching this module. Building a dump of a
large snapshot, and encoding it, runs in a thread: the snapshot is immutable, so that is safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import httptools

from meshproxy.config.model import Meta, Snapshot, VirtualHost
from meshproxy.metrics import Export, render
from meshproxy.net.listen import strip_brackets

log = logging.getLogger("meshproxy.admin")

ADMIN_HEAD_TIMEOUT = 10.0  # seconds to receive a whole admin request
ADMIN_MAX_HEAD = 64 * 1024  # request line + headers
ADMIN_MAX_BODY = 1024 * 1024  # admin POSTs carry no body; anything beyond this is refused
JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"


@dataclasses.dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path: str
    query: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class AdminResponse:
    status: int
    body: bytes = b""
    content_type: str = TEXT_TYPE
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, text: str, status: int = 200) -> AdminResponse:
        return cls(status, text.encode())

    @classmethod
    def json(cls, data: Any, status: int = 200) -> AdminResponse:
        return cls(status, _dumps(data).encode(), JSON_TYPE)


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


class AdminBackend(Protocol):
    """What the admin endpoints ask; implemented by the single process and the supervisor."""

    async def is_ready(self) -> bool: ...
    async def config_dump(self) -> dict[str, Any]: ...
    async def clusters(self) -> dict[str, Any]: ...
    async def stats_export(self) -> Export: ...
    async def drain(self) -> None: ...
    def request_quit(self) -> None: ...


# --------------------------------------------------------------------------- config dump


def to_jsonable(obj: Any) -> Any:
    """Generic JSON form of the config model (frozen dataclasses and friends)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, Meta):
        return obj.as_dict()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, re.Pattern):
        return obj.pattern
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, frozenset | set):
        return sorted((to_jsonable(v) for v in obj), key=str)
    if isinstance(obj, tuple | list):
        return [to_jsonable(v) for v in obj]
    return repr(obj)


def _virtual_hosts(snapshot: Snapshot) -> list[tuple[VirtualHost, list[str]]]:
    """Each distinct virtual host once, with every name that reaches it."""
    seen: dict[int, tuple[VirtualHost, list[str]]] = {}
    table = snapshot.routes
    for alias, vh in table.exact.items():
        seen.setdefault(id(vh), (vh, []))[1].append(alias)
    for suffix, vh in table.wildcards.items():
        seen.setdefault(id(vh), (vh, []))[1].append("*" + suffix)
    if table.catch_all is not None:
        seen.setdefault(id(table.catch_all), (table.catch_all, []))[1].append("*")
    return list(seen.values())


def snapshot_dump(
    snapshot: Snapshot,
    *,
    last_error: str | None = None,
    listeners: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``/config_dump`` document for ``snapshot``."""
    vhosts = []
    for vh, aliases in _virtual_hosts(snapshot):
        d = to_jsonable(vh)
        d["aliases"] = sorted(aliases)
        vhosts.append(d)
    vhosts.sort(key=lambda d: d["name"])
    return {
        "version": snapshot.version,
        "last_error": last_error,
        "proxy": to_jsonable(snapshot.proxy),
        "warnings": list(snapshot.warnings),
        "listeners": listeners or [],
        "virtual_hosts": vhosts,
        "clusters": [to_jsonable(c) for _, c in sorted(snapshot.clusters.items())],
    }


# --------------------------------------------------------------------------- server


def _dumps(data: Any) -> str:
    # indent selects the pure-Python encoder, which lets the loop thread take the GIL back every
    # switch interval when this runs in a worker thread (the C encoder would hold it throughout).
    return json.dumps(data, indent=1) + "\n"


async def _json_off_loop(data: Any) -> AdminResponse:
    """For documents that grow with the config (a 10,000-host dump is tens of MB)."""
    text = await asyncio.to_thread(_dumps, data)
    return AdminResponse(200, text.encode(), JSON_TYPE)


_prometheus_type: str | None = None


def prometheus_content_type() -> str:
    """prometheus_client's exposition content type (imported on first use: ~1 MiB RSS)."""
    global _prometheus_type
    if _prometheus_type is None:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        _prometheus_type = str(CONTENT_TYPE_LATEST)
    return _prometheus_type


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS.update(
    {408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large"}
)
_REASONS.update({500: "Internal Server Error", 503: "Service Unavailable"})


def _serialize(resp: AdminResponse, head_only: bool) -> bytes:
    reason = _REASONS.get(resp.status, "Unknown")
    lines = [
        f"HTTP/1.1 {resp.status} {reason}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
        "Connection: close",
    ]
    lines += [f"{n}: {v}" for n, v in resp.headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body


class _AdminConnection(asyncio.Protocol):
    """One admin client connection: one request, one answer, close."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.size = 0
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.admin._conns.add(self)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(ADMIN_HEAD_TIMEOUT, self._timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.admin._conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.done = True

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.size += len(data)
        if self.size > ADMIN_MAX_HEAD + ADMIN_MAX_BODY:
            self._answer(AdminResponse.text("request too large\n", 413))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._complete()
        except httptools.HttpParserError:
            if not self.done:
                self._answer(AdminResponse.text("bad request\n", 400))

    def eof_received(self) -> bool:
        return self.task is not None  # keep the write side open while answering

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > ADMIN_MAX_HEAD:
            raise ValueError("request line too long")

    def on_message_complete(self) -> None:
        self._complete()

    def _complete(self) -> None:
        if self.done or self.task is not None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        method = self.parser.get_method().decode("ascii", "replace")
        parts = urlsplit(self.url.decode("latin-1"))
        req = AdminRequest(method, parts.path or "/", dict(parse_qsl(parts.query)))
        self.task = asyncio.get_running_loop().create_task(self._serve(req))

    async def _serve(self, req: AdminRequest) -> None:
        try:
            resp = await self.admin.dispatch(req)
        except Exception:
            log.exception("admin: %s %s failed", req.method, req.path)
            resp = AdminResponse.text("internal error\n", 500)
        self._answer(resp, head_only=req.method == "HEAD")

    def _timeout(self) -> None:
        self.timer = None
        if self.task is None:
            self._answer(AdminResponse.text("request timeout\n", 408))

    def _answer(self, resp: AdminResponse, head_only: bool = False) -> None:
        if self.done:
            return
        self.done = True
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(_serialize(resp, head_only))
            t.close()


class Admin:
    """The admin HTTP server; ``extra`` adds ``(method, path) -> handler`` routes."""

    def __init__(
        self,
        backend: AdminBackend,
        extra: Mapping[tuple[str, str], Handler] | None = None,
    ) -> None:
        self.backend = backend
        self.routes: dict[str, dict[str, Handler]] = {}
        for (method, path), handler in (
            (("GET", "/"), self._index),
            (("GET", "/ready"), self._ready),
            (("GET", "/config_dump"), self._config_dump),
            (("GET", "/clusters"), self._clusters),
            (("GET", "/stats/prometheus"), self._prometheus),
            (("GET", "/stats"), self._stats),
            (("POST", "/drain"), self._drain),
            (("POST", "/quitquitquit"), self._quit),
            *(extra or {}).items(),
        ):
            self.routes.setdefault(path, {})[method.upper()] = handler
        self._server: asyncio.Server | None = None
        self._conns: set[_AdminConnection] = set()
        self.address: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"Admin(address={self.address!r})"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port). Raises OSError if it cannot bind."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _AdminConnection(self), strip_brackets(host), port, reuse_address=True
        )
        self._server = server
        self.address = (host, int(server.sockets[0].getsockname()[1]))
        return self.address

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
            if conn.task is not None:
                conn.task.cancel()
        await server.wait_closed()

    async def dispatch(self, req: AdminRequest) -> AdminResponse:
        """The answer to one request (routing by path, then method)."""
        by_method = self.routes.get(req.path)
        if by_method is None:
            return AdminResponse.text("not found\n", 404)
        method = "GET" if req.method == "HEAD" else req.method
        handler = by_method.get(method)
        if handler is None:
            allow = sorted(by_method) + (["HEAD"] if "GET" in by_method else [])
            return AdminResponse(
                405, b"method not allowed\n", headers=(("Allow", ", ".join(sorted(allow))),)
            )
        return await handler(req)

    # ------------------------------------------------------------------ handlers

    async def _index(self, request: AdminRequest) -> AdminResponse:
        paths = sorted(f"{m} {p}" for p, ms in self.routes.items() for m in ms)
        return AdminResponse.text("\n".join(paths) + "\n")

    async def _ready(self, request: AdminRequest) -> AdminResponse:
        if await self.backend.is_ready():
            return AdminResponse.text("LIVE\n")
        return AdminResponse.text("NOT READY\n", 503)

    async def _config_dump(self, request: AdminRequest) -> AdminResponse:
        return await _json_off_loop(await self.backend.config_dump())

    async def _clusters(self, request: AdminRequest) -> AdminResponse:
        return await _json_off_loop(await self.backend.clusters())

    async def _prometheus(self, request: AdminRequest) -> AdminResponse:
        text = render(await self.backend.stats_export())
        return AdminResponse(200, text.encode(), prometheus_content_type())

    async def _stats(self, request: AdminRequest) -> AdminResponse:
        export = await self.backend.stats_export()
        if request.query.get("format") == "json":
            return AdminResponse.json(export)
        text = render(export)
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        return AdminResponse.text("\n".join(lines) + "\n")

    async def _drain(self, request: AdminRequest) -> AdminResponse:
        await self.backend.drain()
        return AdminResponse.text("OK\n")

    async def _quit(self, request: AdminRequest) -> AdminResponse:
        # Answer first; the backend drains and stops the process after this response.
        asyncio.get_running_loop().call_soon(self.backend.request_quit)
        return AdminResponse.text("OK\n")


# --------------------------------------------------------------------------- client


class FetchError(Exception):
    """An admin call to another process failed (connect, timeout, malformed answer)."""


async def fetch(
    host: str, port: int, method: str, path: str, timeout: float
) -> tuple[int, str, bytes]:
    """One HTTP/1.1 request to an admin server: (status, content type, body).

    For the ``--workers`` supervisor calling its workers; reads until the server closes
    (every admin answer is ``Connection: close``), bounded by ``timeout``."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(strip_brackets(host), port)
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            data = await reader.read()
    except (OSError, TimeoutError) as e:
        raise FetchError(f"{method} {host}:{port}{path}: {e or type(e).__name__}") from None
    finally:
        if writer is not None:
            writer.close()
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise FetchError(f"{method} {host}:{port}{path}: not an HTTP answer") from None
    ctype = ""
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-type":
            ctype = value.strip().decode("latin-1").split(";", 1)[0].strip()
        elif name == b"content-length" and value.strip().isdigit():
            length = int(value)
    if not sep or (length is not None and len(body) < length):
        raise FetchError(f"{method} {host}:{port}{path}: answer cut short")
    return status, ctype, body if length is None else body[:length]
