"""Request mirroring (Istio ``mirror`` / ``mirrors[]``, Envoy's router shadow policy).

Theory of operation
-------------------
The proxy's exchange, once it holds the whole request, hands a copy to :meth:`Mirrorer.send`
(the head already passed through :func:`shadow_request_head`, the body already framed as the
head says). ``send`` never awaits and never raises: it decides synchronously (bound, body size,
endpoint pick) and then either writes the copy at once on an idle keep-alive connection of the
mirror cluster or starts one connect task; the rest is callbacks. Each copy is a
:class:`_Shadow`, the :class:`~meshproxy.upstream.connection.ResponseSink` of its connection:
it reads the whole response and throws it away, then gives the connection back to the pool
(reusable only after a complete keep-alive response to a fully written request) or aborts it.

Nothing a mirror does reaches the primary request: there is no await on the caller's path, no
exception out of ``send``, no back-pressure (the copy is already in memory; a slow mirror only
holds its own transport's buffer), and every outcome is a counter:

* ``sent``      copies accepted (``sent == completed + failed + inflight`` at every moment);
* ``completed`` a whole response was read (whatever its status: Envoy does not judge it either);
* ``failed``    no endpoint, the mirror cluster's ``maxConnections`` reached (no idle
  connection), connect failure, reset, protocol error, the deadline, or ``close()``;
* ``dropped``   not attempted: ``Settings.mirror_max_inflight`` copies already in flight, a body
  larger than the replay buffer, or the mirrorer closed.

Every wait has a deadline: one ``call_later`` timer per copy (the ``timeout`` given to ``send``)
covers the connect, the write and the whole response; when it fires the connect task is
cancelled or the connection aborted. ``close()`` ends everything in flight the same way and
awaits the cancelled connect tasks, so nothing is left running.

Envoy semantics kept (``source/common/router/shadow_writer_impl.cc`` and ``router.cc``):

* the copy's Host / ``:authority`` gets ``-shadow`` appended to the host part, before a
  ``:port`` (``reviews:9080`` -> ``reviews-shadow:9080``). Envoy finds the port as the text after
  the last ``:`` unless a ``]`` follows it, so ``[::1]:80`` -> ``[::1]-shadow:80`` and ``[::1]``
  -> ``[::1]-shadow``. One deviation: an unbracketed authority with several colons (a bare IPv6
  address, which HTTP/1.1 does not allow in Host) gets the suffix at its end instead of being
  split at its last colon;
* the shadow is sent with the buffered request body; a body larger than the buffer Envoy keeps
  for retries and shadows (``retry_shadow_buffer_limit``, 1 MiB by default; here
  ``Settings.retry_buffer_bytes``) abandons the shadow (Envoy's ``retry_or_shadow_abandoned``):
  counted in ``dropped``;
* the response is discarded and the primary request never waits for it ("fire and forget").

Mirror copies count in the mirror endpoint's ``active`` requests while in flight (Envoy's shadow
goes through the mirror cluster's load balancer and counts as its active request too), so a
least-request picker spreads them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable

from meshproxy.config.model import Cluster
from meshproxy.errors import Failure
from meshproxy.http.codec import ResponseHead
from meshproxy.settings import Settings
from meshproxy.upstream.connection import UpstreamConnection
from meshproxy.upstream.pool import ClusterState, ConnectFailure, EndpointState, Pools

log = logging.getLogger(__name__)

SHADOW_SUFFIX = b"-shadow"


def shadow_authority(authority: bytes) -> bytes:
    """``authority`` with ``-shadow`` appended to its host part (before a ``:port``).

    ``b"reviews:9080"`` -> ``b"reviews-shadow:9080"``, ``b"reviews"`` -> ``b"reviews-shadow"``,
    ``b"[::1]:80"`` -> ``b"[::1]-shadow:80"`` (as Envoy's ``shadowAppendedHost``)."""
    colon = authority.rfind(b":")
    if colon < 0:
        return authority + SHADOW_SUFFIX
    bracket = authority.rfind(b"]")
    if bracket > colon:  # "[v6]" without a port: the colon is inside the literal
        return authority + SHADOW_SUFFIX
    if bracket < 0 and authority.count(b":") > 1:  # bare IPv6 (not valid in Host): no port
        return authority + SHADOW_SUFFIX
    return authority[:colon] + SHADOW_SUFFIX + authority[colon:]


def shadow_request_head(head: bytes) -> bytes:
    """A serialized HTTP/1.1 request head with its ``Host`` value shadowed.

    The first ``host`` header line (any case; the proxy writes ``host: ...`` right after the
    request line) gets :func:`shadow_authority` of its value, surrounding spaces dropped; every
    other byte stays as it was. A head without a Host line is returned unchanged."""
    end = head.find(b"\r\n\r\n")
    section = head if end < 0 else head[: end + 2]
    lowered = section.lower()
    at = lowered.find(b"\r\nhost:")
    if at < 0:
        return head
    start = at + 7  # after "\r\nhost:"
    eol = head.find(b"\r\n", start)
    if eol < 0:
        return head
    value = head[start:eol].strip(b" \t")
    return head[:start] + b" " + shadow_authority(value) + head[eol:]


class _Shadow:
    """One mirror copy in flight: the discarding ``ResponseSink`` of its upstream connection.

    Created and started by :meth:`Mirrorer.send`; ends exactly once (``done``) through
    :meth:`_complete` or :meth:`_fail`, which cancel the deadline timer, hand the connection
    back or abort it, and settle the counters."""

    __slots__ = (
        "close_delimited",
        "conn",
        "cs",
        "data",
        "done",
        "ep",
        "head_request",
        "mirrorer",
        "reserved",
        "status",
        "task",
        "timer",
        "written",
    )

    def __init__(
        self,
        mirrorer: Mirrorer,
        cs: ClusterState,
        ep: EndpointState,
        data: bytes,
        head_request: bool,
    ) -> None:
        self.mirrorer = mirrorer
        self.cs = cs
        self.ep = ep
        self.data = data
        self.head_request = head_request
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.reserved = False  # a connection slot counted for a connect not yet started
        self.timer: asyncio.TimerHandle | None = None
        self.status = 0  # the mirror's response status once its head arrived
        self.close_delimited = False
        self.written = False
        self.done = False

    # ------------------------------------------------------------------ driving

    def start(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.timer = loop.call_later(timeout, self._expire)
        conn = self.mirrorer.pools.take_idle(self.ep)
        if conn is not None:
            self._send_on(conn)
        else:
            # the slot is counted now, so copies decided in the same loop turn see it
            self.mirrorer.pools.reserve(self.cs, self.ep)
            self.reserved = True
            self.task = loop.create_task(self._connect())

    async def _connect(self) -> None:
        """The connect task: the only await a copy makes (cancelled by the deadline or
        ``close()``, which settle the copy themselves; the cancellation propagates)."""
        self.reserved = False  # Pools.connect owns the slot from here on
        try:
            conn = await self.mirrorer.pools.connect(self.cs, self.ep, reserved=True)
        except ConnectFailure as e:
            self.task = None
            self._fail(Failure.CONNECT_FAILURE, str(e))
            return
        self.task = None
        if self.done:  # cannot happen (the task is cancelled first); keep the connection
            self.mirrorer.pools.release(conn, True, self.cs)
            return
        try:
            self._send_on(conn)
        except Exception:
            log.exception("internal error while sending a mirror request")
            self._fail(Failure.INTERNAL, "internal error")

    def _send_on(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.bind(self, self.head_request)
        conn.write(self.data)
        self.written = True

    def _expire(self) -> None:
        self.timer = None
        self._fail(Failure.UPSTREAM_TIMEOUT, "mirror timeout")

    def cancel(self) -> None:
        """Called by ``Mirrorer.close``: end the copy now."""
        self._fail(Failure.INTERNAL, "mirrorer closed")

    # ------------------------------------------------------------------ endings

    def _settle(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.ep.active -= 1
        m = self.mirrorer
        m.inflight -= 1
        m._live.discard(self)

    def _complete(self, keep_alive: bool) -> None:
        if self.done:
            return
        conn = self.conn
        self.conn = None
        self._settle()
        self.mirrorer.completed += 1
        if conn is not None:
            transport = conn.transport
            fully_sent = (
                self.written and transport is not None and transport.get_write_buffer_size() == 0
            )
            self.mirrorer.pools.release(conn, keep_alive and fully_sent, self.cs)

    def _fail(self, failure: Failure, detail: str) -> None:
        if self.done:
            return
        conn = self.conn
        self.conn = None
        task = self.task
        self.task = None
        self._settle()
        self.mirrorer.failed += 1
        if conn is not None:
            conn.abort()
        if task is not None:
            task.cancel()
        if self.reserved:  # cancelled before it ran: give the slot back
            self.reserved = False
            self.ep.connection_closed()
        log.debug(
            "mirror request to %s (%s) failed: %s %s",
            self.cs.name,
            self.ep.key,
            failure.flag,
            detail,
        )

    # ------------------------------------------------------------------ ResponseSink

    def on_response_head(self, status: int, head: ResponseHead) -> None:
        self.status = status
        # no length and not chunked: the body ends with the upstream's FIN (RFC 9112 6.3)
        self.close_delimited = head.content_length is None and not head.chunked

    def on_response_body(self, data: bytes) -> None:
        pass  # discarded: nobody reads a mirror's answer

    def on_response_complete(self, keep_alive: bool) -> None:
        if self.status == 0:  # a message end without a head: never a response
            self._fail(Failure.UPSTREAM_PROTOCOL_ERROR, "response without a head")
            return
        self._complete(keep_alive)

    def on_upstream_lost(self, failure: Failure) -> None:
        conn = self.conn
        self.conn = None  # closed already (or aborted by the connection itself)
        if (
            self.close_delimited
            and failure is Failure.UPSTREAM_RESET
            and conn is not None
            and conn.clean_eof
        ):
            self._complete(False)  # a close-delimited body ended by its FIN: complete
            return
        self._fail(failure, "connection lost")

    def flush_response(self) -> None:
        pass

    def upstream_pause_writing(self) -> None:
        pass  # the copy is already in memory: nothing upstream of it to pause

    def upstream_resume_writing(self) -> None:
        pass

    def __repr__(self) -> str:
        state = "done" if self.done else ("connecting" if self.task is not None else "sent")
        return f"_Shadow({self.cs.name}, {self.ep.key}, {state}, status={self.status})"


class Mirrorer:
    """Sends fire-and-forget copies of requests to mirror clusters (one per worker process).

    ``send`` is called by the proxy with a shadowed, framed head and the whole body; the
    counters are read by the metrics exporter."""

    def __init__(
        self,
        pools: Pools,
        settings: Settings,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.pools = pools
        self._settings = settings
        self._max_inflight = settings.mirror_max_inflight
        self._max_body = settings.retry_buffer_bytes
        self._rand = rand
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live: set[_Shadow] = set()
        self._closed = False
        self._warned_timeout = False
        self.sent = 0
        self.completed = 0
        self.failed = 0
        self.dropped = 0
        self.inflight = 0

    def send(self, cluster: Cluster, head: bytes, body: bytes, timeout: float) -> None:
        """Start one copy of a request to ``cluster`` and return at once; never raises.

        ``head`` is the serialized request head as the mirror must see it (Host already
        shadowed, framing as the body is encoded), ``body`` the whole framed body, ``timeout``
        the deadline in seconds for the whole copy (connect, write and response). Must be
        called on the running event loop."""
        if self._closed or self.inflight >= self._max_inflight or len(body) > self._max_body:
            self.dropped += 1
            return
        self.sent += 1
        if not (timeout > 0 and math.isfinite(timeout)):  # a caller's bug, never a user's
            self.failed += 1
            if not self._warned_timeout:
                self._warned_timeout = True
                log.warning("mirror requests need a positive finite timeout, got %r", timeout)
            return
        try:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            cs = self.pools.cluster_state(cluster)
            ep = cs.pick(self._rand())
        except Exception:
            log.exception("internal error while starting a mirror request to %s", cluster.name)
            self.failed += 1
            return
        if ep is None:
            self.failed += 1
            log.debug("mirror request to %s failed: no healthy upstream", cluster.name)
            return
        if not ep.idle and not cs.can_connect(ep):
            # the mirror cluster's maxConnections is reached: a copy never takes a connection
            # its primary traffic may need (Envoy's shadow obeys the pool's limits too)
            self.failed += 1
            log.debug("mirror request to %s failed: maxConnections reached", cluster.name)
            return
        shadow = _Shadow(self, cs, ep, head + body if body else head, head.startswith(b"HEAD "))
        ep.active += 1
        self.inflight += 1
        self._live.add(shadow)
        try:
            shadow.start(loop, timeout)
        except Exception:
            log.exception("internal error while sending a mirror request to %s", cluster.name)
            shadow._fail(Failure.INTERNAL, "internal error")

    async def close(self) -> None:
        """Abort every copy in flight (counted as failed) and wait for their connect tasks to
        end; later ``send`` calls are dropped."""
        self._closed = True
        tasks = [s.task for s in self._live if s.task is not None]
        for shadow in list(self._live):
            shadow.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return (
            f"Mirrorer(sent={self.sent}, completed={self.completed}, failed={self.failed},"
            f" dropped={self.dropped}, inflight={self.inflight})"
        )
