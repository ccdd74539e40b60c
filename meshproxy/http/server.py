"""The downstream side of HTTP/1.x: one ``asyncio.Protocol`` per client connection.

Theory of operation
-------------------
:class:`HttpConnection` feeds received bytes to ``httptools.HttpRequestParser`` and turns its
callbacks into :class:`RequestHead` objects and body pieces. It knows nothing about routing:
for each request head it asks the injected factory for an :class:`Exchange` (the proxy's
"one request's life") and drives it with ``start`` / ``on_request_body`` /
``on_request_complete``; the exchange writes the response with :meth:`write` and hands the
connection back with :meth:`exchange_done`.

* **Validation before I/O.** Requests are only *started* after ``feed_data`` returns, so a
  head that llhttp rejects (bad request line, CL+TE, bad Content-Length, bad chunk in the same
  segment) never reaches an upstream. Head size and header count are bounded while parsing
  (431); a Host-less HTTP/1.1 request or an unusable target is a 400. If framing breaks after
  a request was forwarded, the exchange resets its upstream connection so the upstream never
  sees a complete request; the client gets ``400`` (or a reset if its response had started)
  and the connection closes.
* **Pipelining.** Exchanges queue in arrival order; only the head of the queue is started, so
  responses go out in order. Queued requests buffer their (bounded) bodies; reading pauses when
  the queue is longer than :data:`MAX_PIPELINE` or a body buffer is over the high-water mark.
* **Flow control.** ``pause_reading`` is reference counted (several parties may need the
  client to stop sending); write back-pressure on this transport is passed to the active
  exchange, which pauses its upstream.
* **Deadlines without per-request timers.** One lazy ``call_later`` per connection checks the
  head-read deadline (slowloris: ``408``) and the keep-alive idle deadline (silent close); it
  re-arms at most every ``min(head_read_timeout, downstream_idle_timeout)`` and only while
  the connection is idle or reading a head.
* **Drain.** :meth:`drain` closes an idle connection at once; a busy one answers its current
  request with ``Connection: close`` and closes after it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import httptools

from meshproxy.errors import Failure, LocalReply, ProtocolError, local_reply
from meshproxy.http.codec import BodyFraming, local_reply_bytes
from meshproxy.settings import Settings

if TYPE_CHECKING:
    from meshproxy.metrics import Metrics

log = logging.getLogger(__name__)
_monotonic = time.monotonic  # the event loop's clock (loop.time() without a method call)

_NO_BODY = BodyFraming.NONE
MAX_PIPELINE = 16  # requests parsed ahead of the one being answered before reading pauses
LINGER_SECONDS = 2.0  # after an error reply, input is read and dropped this long before close


class LazyHeaders(Mapping[str, str]):
    """The request headers as routing sees them (``str``, lower-case names, repeats joined with
    ``","``), decoded only if a route match or hash policy actually looks at them."""

    __slots__ = ("_d", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._d: dict[str, str] | None = None

    def _build(self) -> dict[str, str]:
        d: dict[str, str] = {}
        for n, v in self._raw:
            name = n.decode("latin-1")
            value = v.decode("latin-1")
            prev = d.get(name)
            d[name] = value if prev is None else f"{prev},{value}"
        self._d = d
        return d

    def get(self, key: str, default: Any = None) -> Any:
        d = self._d
        if d is None:
            d = self._build()
        return d.get(key, default)

    def __getitem__(self, key: str) -> str:
        d = self._d
        if d is None:
            d = self._build()
        return d[key]

    def __iter__(self) -> Iterator[str]:
        d = self._d
        if d is None:
            d = self._build()
        return iter(d)

    def __len__(self) -> int:
        d = self._d
        if d is None:
            d = self._build()
        return len(d)


class RequestHead:
    """A parsed, validated request head (header names lower-case bytes, values as received).

    The request line is kept as received (``method_b``, ``target_b``); ``target`` and ``map``
    (the ``str`` views routing needs) are built only when something reads them."""

    __slots__ = (
        "_map",
        "content_length",
        "drop",
        "expect_continue",
        "framing",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "method",
        "method_b",
        "t0",
        "target_b",
    )

    def __init__(self, t0: float) -> None:
        self.t0 = t0  # when the first byte of the request was parsed
        self.method = ""
        self.method_b = b""
        self.target_b = b""
        self.http11 = True
        self.headers: list[tuple[bytes, bytes]] = []
        self._map: LazyHeaders | None = None
        self.host: str | None = None
        self.keep_alive = True
        self.framing = BodyFraming.NONE
        self.content_length: int | None = None
        self.expect_continue = False
        self.drop: list[bytes] | None = None  # header names listed in Connection

    @property
    def target(self) -> str:
        return self.target_b.decode("latin-1")

    @property
    def map(self) -> Mapping[str, str]:
        m = self._map
        if m is None:
            m = self._map = LazyHeaders(self.headers)
        return m

    def __repr__(self) -> str:
        return f"RequestHead({self.method} {self.target} http11={self.http11})"


# Request headers the codec itself looks at.
_SPECIAL = frozenset({b"host", b"connection", b"transfer-encoding", b"content-length", b"expect"})
# Connection tokens that never name a header to drop (framing and routing need these).
_NOT_DROPPED = frozenset({b"close", b"keep-alive", b"host", b"content-length"})
# Methods as str, without a decode per request.
_METHODS = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
}


class Exchange(Protocol):
    """One request's life, as the connection sees it (implemented in ``meshproxy.proxy``)."""

    started: bool
    response_started: bool

    def start(self) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_complete(self) -> None: ...
    def on_request_error(self, status: int) -> bool: ...
    def on_downstream_lost(self) -> None: ...
    def downstream_pause_writing(self) -> None: ...
    def downstream_resume_writing(self) -> None: ...


ExchangeFactory = Callable[["HttpConnection", RequestHead], Exchange]


class ServerContext:
    """What every connection of a listener shares: settings, metrics, the exchange factory
    and the registry of open connections (for drain)."""

    __slots__ = ("_empty", "connections", "draining", "factory", "metrics", "settings")

    def __init__(self, settings: Settings, metrics: Metrics, factory: ExchangeFactory) -> None:
        self.settings = settings
        self.metrics = metrics
        self.factory = factory
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self._empty: asyncio.Event | None = None

    def add(self, conn: HttpConnection) -> None:
        self.connections.add(conn)
        self.metrics.downstream_connections(1)

    def remove(self, conn: HttpConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.metrics.downstream_connections(-1)
            if not self.connections and self._empty is not None:
                self._empty.set()

    async def wait_empty(self, timeout: float) -> bool:
        if not self.connections:
            return True
        if self._empty is None or self._empty.is_set():
            self._empty = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return not self.connections
        return True


class HttpConnection(asyncio.Protocol):
    """A client connection: parse, validate, queue exchanges, keep deadlines."""

    __slots__ = (
        "_error",
        "_head",
        "_head_bytes",
        "_head_t0",
        "_idle_since",
        "_in_head",
        "_loop",
        "_max_head",
        "_max_headers",
        "_msg_seq",
        "_no_more",
        "_paused",
        "_queue",
        "_raw_head",
        "_reading",
        "_tick",
        "_timer",
        "closed",
        "ctx",
        "parser",
        "peer_ip",
        "peer_ip_b",
        "scheme",
        "scheme_b",
        "transport",
        "write_paused",
    )

    def __init__(self, ctx: ServerContext, scheme: str = "http") -> None:
        self.ctx = ctx
        self.scheme = scheme
        self.scheme_b = scheme.encode("latin-1")
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.peer_ip_b = b""
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.write_paused = False  # the client is not reading: exchanges must not read upstream
        self._loop = asyncio.get_running_loop()
        self._queue: deque[Exchange] = deque()
        self._reading: Exchange | None = None
        self._head: RequestHead | None = None
        self._head_bytes = 0
        self._raw_head = 0
        self._in_head = False
        self._head_t0 = 0.0
        self._msg_seq = 0
        self._idle_since = 0.0
        self._no_more = False  # stop parsing: Connection: close, upgrade, error, drain
        self._error: LocalReply | None = None  # answered after the queued responses
        self._paused = 0
        self._timer: asyncio.TimerHandle | None = None
        s = ctx.settings
        self._tick = min(s.head_read_timeout, s.downstream_idle_timeout)
        self._max_head = s.max_head_bytes
        self._max_headers = s.max_headers

    # ------------------------------------------------------------------ used by exchanges

    @property
    def draining(self) -> bool:
        return self.ctx.draining

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        self._paused += 1
        if self._paused == 1 and self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused -= 1
        if self._paused == 0 and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Reset the client connection (a response that cannot be completed)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    @property
    def current(self) -> Exchange | None:
        """The exchange being answered (the front of the pipeline), if any."""
        q = self._queue
        return q[0] if q else None

    def exchange_done(self, ex: Exchange, close: bool) -> None:
        """Called by the active exchange once its response is completely written."""
        queue = self._queue
        if queue and queue[0] is ex:
            queue.popleft()
        elif ex in queue:
            queue.remove(ex)
        if self._reading is ex and close:
            self._reading = None
        if close or self.ctx.draining:
            self._close()
            return
        if len(queue) == MAX_PIPELINE:
            self.resume_reading()
        if queue:
            nxt = queue[0]
            if not nxt.started:
                nxt.start()
            return
        if self._error is not None:
            self._send_error(self._error)
            return
        if self._no_more and self._reading is None:
            self._close()
            return
        self._became_idle()

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        s = self.ctx.settings
        transport.set_write_buffer_limits(s.high_water, s.low_water)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0]
            self.peer_ip_b = peer[0].encode("latin-1")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.ctx.add(self)
        if self.ctx.draining:
            self._close()
            return
        self._became_idle()

    def data_received(self, data: bytes) -> None:
        if self._no_more:
            return
        was_in_head = self._in_head
        seq = self._msg_seq
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade / CONNECT: the request itself is complete; the protocol switch is not
            # proxied (Upgrade is hop-by-hop), so nothing after it is read.
            self._no_more = True
        except httptools.HttpParserError as e:
            cause = e.__context__
            if cause is None and self._no_more and self._reading is None and not self._in_head:
                # Bytes after a request that ends the connection (Connection: close, HTTP/1.0
                # without keep-alive): llhttp refuses them; they are ignored, not an error.
                pass
            elif isinstance(cause, ProtocolError):
                self._fail(cause.failure)
                return
            elif cause is not None and isinstance(e, httptools.HttpParserCallbackError):
                # not the client's fault: a bug below a parser callback
                log.error("internal error while handling a request", exc_info=cause)
                self._fail(Failure.INTERNAL)
                return
            else:
                self._fail(Failure.BAD_REQUEST)
                return
        except ProtocolError as e:  # raised outside a parser callback
            self._fail(e.failure)
            return
        if self._in_head and was_in_head and seq == self._msg_seq:
            # The whole segment belongs to a head still incomplete: bound what llhttp buffers.
            self._raw_head += len(data)
            if self._raw_head > self.ctx.settings.max_head_bytes:
                self._fail(Failure.HEADERS_TOO_LARGE)
                return
        queue = self._queue
        if queue:
            ex = queue[0]
            if not ex.started:
                ex.start()

    def eof_received(self) -> bool:
        # Half-close from the client: answer what was fully received, then close.
        self._no_more = True
        if self._in_head or (self._reading is not None):
            return False
        if not self._queue:
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, deque()
        for ex in queue:
            ex.on_downstream_lost()
        self._reading = None
        self.ctx.remove(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._queue:
            self._queue[0].downstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._queue:
            self._queue[0].downstream_resume_writing()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._msg_seq += 1
        now = _monotonic()
        self._head = RequestHead(now)
        self._head_bytes = 0
        self._raw_head = 0
        self._head_t0 = now
        if self._timer is None:
            self._timer = self._loop.call_later(self._tick, self._on_timer)

    def on_url(self, url: bytes) -> None:
        head = self._head
        assert head is not None
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head:
            raise ProtocolError(Failure.HEADERS_TOO_LARGE, "request line too long")
        head.target_b += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field of a chunked body: dropped, as Envoy does for HTTP/1
        head = self._head
        assert head is not None
        n = self._head_bytes = self._head_bytes + len(name) + len(value) + 4
        headers = head.headers
        if n > self._max_head or len(headers) >= self._max_headers:
            raise ProtocolError(Failure.HEADERS_TOO_LARGE, "request head too large")
        headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        self._in_head = False
        p = self.parser
        mb = head.method_b = p.get_method()
        head.method = _METHODS.get(mb) or mb.decode("ascii")
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            raise ProtocolError(Failure.BAD_REQUEST, f"HTTP/{version}")
        http11 = head.http11 = version == "1.1"
        keep_alive = http11
        special = _SPECIAL
        other_coding: bytes | None = None
        for name, value in head.headers:
            if name in special:
                if name == b"host":
                    if head.host is not None:
                        raise ProtocolError(Failure.BAD_REQUEST, "repeated Host")
                    head.host = value.decode("latin-1")
                elif name == b"connection":
                    toks = [t.strip() for t in value.lower().split(b",")]
                    if http11:
                        keep_alive = keep_alive and b"close" not in toks
                    elif b"keep-alive" in toks:
                        keep_alive = True
                    for tok in toks:
                        if tok and tok not in _NOT_DROPPED:
                            if head.drop is None:
                                head.drop = []
                            head.drop.append(tok)
                elif name == b"transfer-encoding":
                    head.framing = BodyFraming.CHUNKED
                    if value != b"chunked" and value.strip().lower() != b"chunked":
                        other_coding = value
                elif name == b"content-length":
                    head.content_length = int(value)  # llhttp validated it
                elif value.lower() == b"100-continue":
                    head.expect_continue = True
        if other_coding is not None:  # the final coding of the last header decides
            # Only chunked is implemented. Codings that end in chunked are accepted by llhttp
            # and answered 501 as Envoy does; any other final coding is llhttp's 400.
            for name, value in reversed(head.headers):
                if name == b"transfer-encoding":
                    if value.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
                        raise ProtocolError(Failure.NOT_IMPLEMENTED, "transfer-coding")
                    break
        head.keep_alive = keep_alive
        if head.framing is BodyFraming.CHUNKED:
            head.content_length = None
        elif head.content_length is not None:
            head.framing = BodyFraming.LENGTH
        if head.host is None and http11:
            raise ProtocolError(Failure.BAD_REQUEST, "missing Host")
        if head.drop is not None and b"upgrade" in head.drop and head.framing is not _NO_BODY:
            # llhttp ends an Upgrade request at its head, so its body would be lost or read
            # as the next request; the protocol switch is not proxied: refuse it.
            if head.framing is BodyFraming.CHUNKED or head.content_length:
                raise ProtocolError(Failure.BAD_REQUEST, "Upgrade request with a body")
        ex = self.ctx.factory(self, head)
        self._reading = ex
        queue = self._queue
        queue.append(ex)
        if len(queue) == MAX_PIPELINE + 1:
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        ex = self._reading
        if ex is not None:
            ex.on_request_body(body)

    def on_message_complete(self) -> None:
        # should_keep_alive() is only meaningful here: llhttp resets once feed_data returns.
        keep = self.parser.should_keep_alive()
        ex = self._reading
        self._reading = None
        self._head = None
        if not keep:
            self._no_more = True
        if ex is not None:
            ex.on_request_complete()

    # ------------------------------------------------------------------ internals

    def _became_idle(self) -> None:
        if self.ctx.draining:
            self._close()
            return
        self._idle_since = _monotonic()
        if self._timer is None:
            self._timer = self._loop.call_later(self._tick, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = _monotonic()
        s = self.ctx.settings
        if self._in_head:
            deadline = self._head_t0 + s.head_read_timeout
            if now >= deadline - 0.001:
                self._fail(Failure.HEAD_TIMEOUT)
                return
        elif not self._queue and self._reading is None:
            deadline = self._idle_since + s.downstream_idle_timeout
            if now >= deadline - 0.001:
                self._close()
                return
        else:
            return  # busy: re-armed when a head starts or the connection turns idle
        self._timer = self._loop.call_later(min(deadline - now, self._tick), self._on_timer)

    def _fail(self, failure: Failure) -> None:
        """A protocol error: stop reading, drop the broken request, answer after the queued
        responses, then close."""
        self._no_more = True
        self._in_head = False
        reply = local_reply(failure)
        ex = self._reading
        self._reading = None
        if ex is not None:
            started = ex.started
            response_started = ex.on_request_error(reply.status)
            if started and response_started:
                self.abort()
                return
            if ex in self._queue:
                self._queue.remove(ex)
        else:
            self.ctx.metrics.record_request(None, reply.status, reply.flag, 0.0, 0, len(reply.body))
        if self._queue:
            self._error = reply
            q0 = self._queue[0]
            if not q0.started:
                q0.start()
            return
        self._send_error(reply)

    def _send_error(self, reply: LocalReply) -> None:
        """Answer a protocol error and close without a reset: half-close, then discard what
        the client still sends for up to :data:`LINGER_SECONDS` (closing with unread input
        would make the kernel send RST and the client could lose the answer)."""
        self._error = None
        self._no_more = True
        self.write(
            local_reply_bytes(reply.status, reply.body, content_type=reply.content_type, close=True)
        )
        t = self.transport
        if t is None or self.closed:
            return
        if t.can_write_eof():
            t.write_eof()
            if self._paused:
                self._paused = 0
                t.resume_reading()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(LINGER_SECONDS, self._close)
        else:
            self._close()

    def _close(self) -> None:
        self._no_more = True
        if self.transport is not None and not self.closed:
            self.transport.close()

    def drain(self) -> None:
        """Graceful drain: close now if idle, else after the current response."""
        if self.closed:
            return
        if not self._queue and self._reading is None and not self._in_head:
            self._close()

    def __repr__(self) -> str:
        return (
            f"HttpConnection(peer={self.peer_ip}, queued={len(self._queue)},"
            f" in_head={self._in_head}, closed={self.closed})"
        )
