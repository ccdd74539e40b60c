"""The access log (``meshproxy run --access-log PATH|-|off``): one JSON object per request.

Theory of operation
-------------------
The data plane calls :meth:`AccessLog.record` once per finished request, from the same place
that records the request's metrics (``Exchange._finish``), and only when the log is on: with
``--access-log off`` (the default) the data plane holds ``None`` and pays one ``is not None``
test per request.

A line is built by the pure :func:`format_line` (Envoy's field meanings: ``start_time`` ISO-8601
UTC with milliseconds, ``path`` the original request path with its query, ``upstream_host`` /
``upstream_cluster`` null when none was picked, ``response_flags`` ``-`` when none,
``response_code`` 0 when the client left before a response) and appended to an in-memory
buffer. No file I/O happens per request: the buffer is written with one ``os.write`` of whole
lines when it passes :data:`FLUSH_BYTES`, or by a single ``call_later`` timer
(:data:`FLUSH_INTERVAL` after the first buffered line; at most one pending per process), and at
:meth:`AccessLog.close` (drain/exit). The file is opened with ``O_APPEND``, so several
``--workers`` processes can append to the same PATH: every write call carries whole lines
only, hence lines from different processes never interleave within a line.

``-`` is standard output, which also carries the ``listening ...`` line: nothing is written
before :meth:`AccessLog.start` is called, which the composition root does right after that line
is printed and flushed. A PATH that cannot be opened at start-up raises
:class:`AccessLogError` (the caller turns it into exit code 2); a write that fails later is
logged once and the lines are dropped (the proxy keeps serving).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshproxy.proxy import Exchange

log = logging.getLogger(__name__)

FLUSH_BYTES = 64 * 1024  # write the buffer once it holds this many bytes
FLUSH_INTERVAL = 0.1  # seconds: buffered lines are written at most this late
OFF = "off"
STDOUT = "-"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class AccessLogError(Exception):
    """The access log target cannot be opened (a user mistake: exit 2)."""


def iso_utc_ms(ts: float) -> str:
    """Epoch seconds -> ``2026-11-26T17:55:00.123Z`` (Envoy's ``%START_TIME%`` in UTC)."""
    ms = int(ts * 1000)
    secs, frac = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:03d}Z"


def format_line(
    *,
    start_time: float,
    method: str,
    path: str,
    authority: str,
    response_code: int,
    response_flags: str,
    upstream_host: str | None,
    upstream_cluster: str | None,
    duration_ms: int,
    bytes_received: int,
    bytes_sent: int,
    attempts: int,
    request_id: str | None,
) -> str:
    """One access log line (a JSON object and a newline). ``start_time`` is epoch seconds."""
    entry: dict[str, Any] = {
        "start_time": iso_utc_ms(start_time),
        "method": method,
        "path": path,
        "authority": authority,
        "response_code": response_code,
        "response_flags": response_flags or "-",
        "upstream_host": upstream_host,
        "upstream_cluster": upstream_cluster,
        "duration_ms": duration_ms,
        "bytes_received": bytes_received,
        "bytes_sent": bytes_sent,
        "attempts": attempts,
        "request_id": request_id,
    }
    return _dumps(entry) + "\n"


def _request_path_authority(ex: Exchange) -> tuple[str, str]:
    """The original request path (with query) and authority, as the client sent them: for an
    absolute-form target the path and authority come from the URL (Envoy's ``:path`` /
    ``:authority``)."""
    from meshproxy.http.codec import TargetError, parse_target

    head = ex.head
    target = head.target
    authority = head.host or ""
    if not target.startswith("/"):
        try:
            _scheme, url_authority, path = parse_target(target)
        except TargetError:
            return target, authority
        if url_authority is not None:
            authority = url_authority
        return path, authority
    return target, authority


def _request_id(ex: Exchange) -> str:
    """The ``x-request-id`` the upstream got (or would have got): the client's when present,
    else a fresh one (Envoy generates one for every request, local replies included)."""
    rid = ex.request_id
    if rid:
        return rid.decode("latin-1")
    for name, value in ex.head.headers:
        if name == b"x-request-id" and value:
            return value.decode("latin-1")
    return str(uuid.uuid4())


def exchange_line(ex: Exchange, code: int, flags: str, now_wall: float, now_mono: float) -> str:
    """The access log line of a finished exchange (``now_*``: when it finished)."""
    head = ex.head
    elapsed = max(0.0, now_mono - head.t0)
    path, authority = _request_path_authority(ex)
    ep = ex.ep
    cluster = ex.cluster
    return format_line(
        start_time=now_wall - elapsed,
        method=head.method,
        path=path,
        authority=authority,
        response_code=code,
        response_flags=flags,
        upstream_host=ep.key if ep is not None else None,
        upstream_cluster=cluster.name if cluster is not None else None,
        duration_ms=int(elapsed * 1000),
        bytes_received=ex.req_bytes,
        bytes_sent=ex.resp_bytes,
        attempts=ex.attempts,
        request_id=_request_id(ex),
    )


def open_fd(target: str) -> tuple[int, bool]:
    """``-`` -> (stdout's fd, not owned); PATH -> (an O_APPEND fd, owned). Raises
    :class:`AccessLogError` with a clear message when PATH cannot be opened."""
    if target == STDOUT:
        return 1, False
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise AccessLogError(f"cannot open access log {target}: {e.strerror or e}") from None
    return fd, True


def check_target(target: str) -> None:
    """Raise :class:`AccessLogError` now if ``target`` could not be opened (used by the
    ``--workers`` supervisor before it starts any worker)."""
    if target in (OFF, STDOUT):
        return
    fd, owned = open_fd(target)
    if owned:
        os.close(fd)


class AccessLog:
    """A buffered, append-only JSON-lines writer on one file descriptor."""

    def __init__(
        self,
        fd: int,
        *,
        owned: bool,
        flush_bytes: int = FLUSH_BYTES,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._fd = fd
        self._owned = owned
        self._flush_bytes = flush_bytes
        self._flush_interval = flush_interval
        self._lines: list[str] = []
        self._size = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start(): writes allowed
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False
        self._closed = False
        self.written_lines = 0

    @classmethod
    def open(cls, target: str) -> AccessLog | None:
        """``off`` -> None; ``-`` -> stdout; else PATH in append mode (AccessLogError)."""
        if target == OFF:
            return None
        fd, owned = open_fd(target)
        return cls(fd, owned=owned)

    def __repr__(self) -> str:
        return f"AccessLog(fd={self._fd}, buffered={len(self._lines)}, closed={self._closed})"

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Allow writes from now on (after the ``listening`` line) and flush what is held."""
        self._loop = loop or asyncio.get_running_loop()
        if self._lines:
            self._schedule()

    def record(self, ex: Exchange, code: int, flags: str) -> None:
        """Buffer the line of a finished exchange (called by ``Exchange._finish``)."""
        self.append(exchange_line(ex, code, flags, time.time(), time.monotonic()))

    def append(self, line: str) -> None:
        """Buffer one whole line (ending in a newline)."""
        if self._closed:
            return
        self._lines.append(line)
        self._size += len(line)
        if self._loop is None:
            return
        if self._size >= self._flush_bytes:
            self.flush()
        elif self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(self._flush_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write every buffered line with one ``os.write`` (looping on a short write)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._size = 0
        if self._failed:
            return
        data = "".join(lines).encode("utf-8", "backslashreplace")
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            self._failed = True
            log.error("access log write failed, access logging stops: %s", e)
            return
        self.written_lines += len(lines)

    def close(self) -> None:
        """Flush what is buffered and close the file (drain / exit)."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._owned:
            try:
                os.close(self._fd)
            except OSError as e:
                log.warning("closing the access log: %s", e)
