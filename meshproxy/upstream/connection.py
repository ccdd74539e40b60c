"""One HTTP/1.1 connection to an upstream endpoint, as an ``asyncio.Protocol``.

Theory of operation
-------------------
An :class:`UpstreamConnection` carries one request at a time (no upstream pipelining). The
request's owner (a :class:`ResponseSink`, the proxy's exchange) is attached with :meth:`bind`,
writes its request with :meth:`write`, and receives the response through the sink callbacks,
driven by ``httptools.HttpResponseParser``:

* ``on_response_head(status, head)`` once the final (non-1xx) head is parsed, with the
  headers already filtered into a :class:`~meshproxy.http.codec.ResponseHead` while llhttp
  reported them (hop-by-hop headers noted, not kept; the rest as ready ``name: value`` lines);
  interim 1xx responses are swallowed (the proxy answers ``100 Continue`` itself);
* ``on_response_body(data)`` for every body piece, and ``flush_response()`` at the end of each
  read that leaves the response unfinished (the sink batches one read's output into one write;
  a sink whose response completed has flushed it already);
* ``on_response_complete(keep_alive)`` at the end of the message, once ``feed_data`` has
  returned (so the pool never hands the connection to another request while this read is
  still being parsed); ``keep_alive`` is read *inside* the parser's ``on_message_complete``
  (httptools resets its state once ``feed_data`` returns). Bytes seen after the end of the
  response in the same read (a body on a HEAD / 204 / 304 response, a second head) make
  ``keep_alive`` false: the upstream is out of step and the connection is not reused;
* ``on_upstream_lost(failure)`` if the connection closes or breaks before that. A response
  without length is close-delimited: its end is the close, which the sink sees here too;
  :attr:`clean_eof` tells a FIN (the body's end) from a reset (a truncated body).

A response to ``HEAD`` has no body whatever its headers say, but llhttp cannot be told so, so
the head completes the message and the parser is replaced after ``feed_data`` returns. A
response with a transfer-coding other than ``chunked`` is a protocol error (not implemented).

Write back-pressure is forwarded to the sink (``upstream_pause_writing`` / ``..._resume_...``),
which pauses the client's side; :meth:`pause_reading` lets the sink stop reading the upstream
while the client is slow. When the sink is done, the pool decides (``reusable``) whether the
connection goes back to the idle list: only after a complete, keep-alive response to a fully
sent request.

A TLS connection (made by ``Pools.connect``) carries ``tls_key``, the pool's
:class:`~meshproxy.upstream.pool.TlsKey` for what it was made and verified with (context, SNI,
accepted peer names; None for plaintext): the pool hands it out only while that key is still
its endpoint's. After its first complete response the connection stores its TLS session on
the endpoint with that key, for resumption (``tls_pending``).
A TLS error that ends the first exchange before any response head is reported as
``Failure.TLS_FAILURE`` (TLS 1.3 servers refuse a client certificate after the client's side
of the handshake has completed), any other loss as ``Failure.UPSTREAM_RESET``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Protocol

import httptools

from meshproxy.errors import Failure
from meshproxy.http.codec import RESPONSE_SPECIAL, ResponseHead

if TYPE_CHECKING:
    from meshproxy.upstream.pool import EndpointState, TlsKey


log = logging.getLogger(__name__)
_monotonic = time.monotonic


class ResponseSink(Protocol):
    """What an upstream connection reports to (implemented by the proxy's exchange)."""

    def on_response_head(self, status: int, head: ResponseHead) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self, keep_alive: bool) -> None: ...
    def on_upstream_lost(self, failure: Failure) -> None: ...
    def flush_response(self) -> None: ...
    def upstream_pause_writing(self) -> None: ...
    def upstream_resume_writing(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_done",
        "_head_done",
        "_interim",
        "_limits",
        "_lines",
        "_parser",
        "_rh",
        "_stray",
        "_timer",
        "clean_eof",
        "closed",
        "counted",
        "endpoint",
        "expect_no_body",
        "idle_since",
        "requests",
        "sink",
        "tls_key",
        "tls_pending",
        "transport",
    )

    def __init__(self, endpoint: EndpointState, high_water: int, low_water: int) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.requests = 0  # requests sent on this connection
        self.closed = False
        self.counted = False  # counted in the endpoint's open connections (set by the pool)
        self.idle_since = 0.0
        self.expect_no_body = False  # the current request is HEAD
        self._timer: asyncio.TimerHandle | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._rh = ResponseHead()
        self._lines = self._rh.lines
        self._interim = False  # parsing a 1xx response that is not forwarded
        self._head_done = False  # HEAD response finished at its head: parser to be replaced
        self._limits = (high_water, low_water)
        # A completed response is reported after feed_data returns, not from the parser
        # callback, so bytes after it in the same read are seen first (``_stray``).
        self._done: tuple[ResponseSink, bool] | None = None
        self._stray = False  # bytes after the end of the response: never reuse
        self.clean_eof = False  # the connection ended by EOF (not a reset)
        # TLS: the pool key it was made and verified under (None: plaintext);
        # tls_pending: its session is saved for resumption after the first response (TLS 1.3
        # tickets arrive after the handshake, read with the response)
        self.tls_key: TlsKey | None = None
        self.tls_pending = False

    # ------------------------------------------------------------------ called by the owner

    def bind(self, sink: ResponseSink, head_request: bool) -> None:
        """Attach the exchange that owns the next request on this connection."""
        self.sink = sink
        self.expect_no_body = head_request
        self.requests += 1

    def unbind(self) -> None:
        self.sink = None

    def write(self, data: bytes) -> None:
        if self.closed:  # lost already: its owner hears of it through on_upstream_lost
            return
        assert self.transport is not None
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close gracefully (after buffered writes)."""
        self.sink = None
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Reset the connection at once: the upstream never sees a complete request."""
        self.sink = None
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        high, low = self._limits
        transport.set_write_buffer_limits(high, low)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the upstream is confused; never reuse it.
            self.closed = True
            self.endpoint.discard(self)
            if self.transport is not None:
                self.transport.abort()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            # not HTTP/1.x, or a protocol switch the proxy never asked for
            cause = e.__context__
            if cause is not None and not isinstance(cause, ValueError):
                log.error("internal error while handling a response", exc_info=cause)
            sink = self.sink
            self.sink = None
            self.closed = True
            self.endpoint.discard(self)
            if self.transport is not None:
                self.transport.abort()
            done = self._done
            if done is not None:  # garbage after a complete response: that one stands
                self._done = None
                done[0].on_response_complete(False)
            elif sink is not None:
                sink.on_upstream_lost(Failure.UPSTREAM_PROTOCOL_ERROR)
            return
        if self._head_done:
            self._head_done = False
            self._parser = httptools.HttpResponseParser(self)
        done = self._done
        if done is not None:
            self._done = None
            sink, keep = done
            if self._stray:
                # bytes after a response (a body on a HEAD / 204 / 304 response): the
                # upstream is out of step; the connection is not reused
                self._stray = False
                keep = False
            sink.on_response_complete(keep)
        elif self.sink is sink:  # still streaming
            sink.flush_response()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost reports to the sink

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.clean_eof = exc is None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.endpoint.discard(self)
        if self.counted:
            self.counted = False
            self.endpoint.connection_closed()
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.on_upstream_lost(self._lost_failure(exc))

    def _lost_failure(self, exc: Exception | None) -> Failure:
        """Why the request in flight was lost. A TLS error (the peer's alert) ending a TLS
        connection's first exchange before any response head is the handshake failing: under
        TLS 1.3 a server refuses our client certificate only after our side of the handshake
        is complete, so its alert arrives with the first read (Envoy: 503 UF, TLS error)."""
        if (
            isinstance(exc, ssl.SSLError)
            and self.tls_key is not None
            and self.requests <= 1
            and self.tls_pending
            and not self._parser.get_status_code()
        ):
            return Failure.TLS_FAILURE
        return Failure.UPSTREAM_RESET

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume_writing()

    # ------------------------------------------------------------------ parser callbacks

    # No on_message_begin (one Python call per response saved): the head being collected is
    # replaced as soon as it is handed over (or dropped, for a 1xx) in on_headers_complete.

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname not in RESPONSE_SPECIAL:
            self._lines.append(lname + b": " + value + b"\r\n")
        elif lname == b"content-length":
            try:
                self._rh.content_length = int(value)
            except ValueError:
                self._rh.content_length = None
        else:
            self._rh.add_special(lname, value)

    def on_headers_complete(self) -> None:
        rh = self._rh
        rh2 = self._rh = ResponseHead()
        self._lines = rh2.lines
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                raise ValueError("101 Switching Protocols without an Upgrade request")
            self._interim = True
            return
        sink = self.sink
        if sink is None:
            if self._done is not None:
                self._stray = True  # another response head right after the last one
            return
        if rh.other_coding:
            raise ValueError("transfer-coding other than chunked")  # -> 503 UPE
        if rh.dropped:
            rh.finish()
        sink.on_response_head(status, rh)
        if self.expect_no_body and self.sink is sink:
            # HEAD: the message ends here; keep-alive from version + Connection. Completed
            # once feed_data returns; whatever llhttp takes for its body is stray.
            if rh.close:
                keep = False
            else:
                keep = rh.keep_alive or self._parser.get_http_version() == "1.1"
            self._head_done = True
            self.sink = None
            self._done = (sink, keep)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            if not self._interim:
                sink.on_response_body(body)
        elif self._done is not None:
            self._stray = True

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        sink = self.sink
        if sink is None:
            return
        keep = self._parser.should_keep_alive()
        self.sink = None
        self._done = (sink, keep)
        if self.tls_pending:
            self._save_session()

    def _save_session(self) -> None:
        """Keep this connection's TLS session on its endpoint: the next handshake to the
        endpoint offers it, if it is made under the same TLS key (the same context, SNI and
        accepted peer names: a resumed TLS 1.2 session keeps the SNI it was made with)."""
        self.tls_pending = False
        key = self.tls_key
        if key is None or self.transport is None:
            return
        obj = self.transport.get_extra_info("ssl_object")
        session = obj.session if obj is not None else None
        if session is not None:
            self.endpoint.tls_session = (key, session)

    # ------------------------------------------------------------------ idle bookkeeping

    def arm_idle_timer(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Called by the pool when the connection turns idle: one lazy timer, re-armed only
        when it fires early (no per-request timer churn)."""
        self.idle_since = _monotonic()
        if self._timer is None:
            self._timer = loop.call_later(timeout, self._idle_check, loop, timeout)

    def _idle_check(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._timer = None
        if self.closed or self.sink is not None or not self.endpoint.is_idle(self):
            return
        remaining = self.idle_since + timeout - _monotonic()
        if remaining <= 0.001:
            self.endpoint.discard(self)
            self.close()
        else:
            self._timer = loop.call_later(remaining, self._idle_check, loop, timeout)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self.sink is not None else "idle")
        return f"UpstreamConnection({self.endpoint.key}, {state}, requests={self.requests})"
