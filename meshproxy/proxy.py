"""One request's life: read the snapshot once, route, make the upstream attempt, stream back.

Theory of operation
-------------------
The downstream connection (``meshproxy.http.server``) creates one :class:`Exchange` per request
head and starts it when it reaches the front of the pipeline queue. ``start`` does all the
deciding synchronously, against one ``state.snapshot`` read:

1. target + authority -> (host, port, virtual host), memoised per snapshot and authority (the
   memo's bound scales with the snapshot's names, so a 10,000-host table rotating over every
   host is served from it, while made-up Host headers cannot grow it past that bound); a
   :class:`~meshproxy.core.routing.RequestInfo` is built only when a route match, a redirect
   or a hash policy needs one;
2. route (404 ``NR``), then the route's action: direct response, redirect, or
   a weighted destination -> cluster (503 ``NC``) -> endpoint through the cluster's picker
   (503 ``UH``). When the Host names no route and iptables redirected the connection
   (``meshproxy capture``; :class:`OutboundConnection` reads ``SO_ORIGINAL_DST`` once, on the
   first such request), the original destination decides instead: the ServiceEntry whose
   ``addresses`` hold it, else Istio's ``outboundTrafficPolicy``: ``ALLOW_ANY`` forwards to the
   original destination (``PassthroughCluster``), ``REGISTRY_ONLY`` answers ``502``
   (``BlackHoleCluster``, flag ``NR``). Requests that were not redirected keep the ``404``.
   A redirected connection that does not start like HTTP (TLS, a database protocol) is
   tunnelled byte for byte to its original destination (:class:`OutboundConnection`);
3. the upstream request head: hop-by-hop headers dropped, ``x-request-id`` / XFF / XFP /
   ``x-envoy-attempt-count``, rewrite (``x-envoy-original-path``), request header operations
   in Envoy's order: the destination's (weighted cluster's) first, then the route's, so a
   route-level ``set`` wins (response operations likewise). Without a rewrite or header
   operations the head is serialized in one pass (``build_request_head``), the common case.

Then :meth:`Exchange._attempt` makes *one* upstream attempt: a pooled keep-alive connection
when there is one (no await at all on that path), else a connect under the cluster's
``connect_timeout``. Every failure of the attempt arrives as a :class:`~meshproxy.errors.Failure`
in :meth:`Exchange._attempt_failed`, the single place where retries, per-try timeouts and
outlier accounting will slot in; today it maps the failure to Envoy's local reply.

Bodies stream both ways without buffering: request body pieces are written to the upstream
as they arrive (re-chunked if chunked; held only while the connection is being set up, with
reading paused above the high-water mark), response pieces go straight to the client, and
each side's write back-pressure pauses reading on the other side.

Nothing here formats log lines; the outcome of every request is one ``metrics.record_request``
call with the response code and Envoy response flag, plus one ``AccessLog.record`` call when
``--access-log`` is on (``ctx.access_log`` is None otherwise: one ``is not None`` test).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from meshproxy.config.meta import Meta
from meshproxy.config.model import (
    DEFAULT_RETRY,
    NO_HEADER_OPS,
    NO_HEADERS,
    Cluster,
    ConnectionPool,
    Endpoint,
    FaultPolicy,
    HeaderOps,
    Match,
    RetryBudget,
    Route,
    Snapshot,
    VirtualHost,
    WeightedCluster,
)
from meshproxy.core.balance import hash_key_for
from meshproxy.core.retry import Outcome, backoff, retriable, retry_allowed
from meshproxy.core.routing import (
    RequestInfo,
    apply_header_ops,
    find_virtual_host,
    host_for_address,
    pick_cluster,
    redirect_response,
    rewritten_path,
    select_route,
)
from meshproxy.errors import Failure, LocalReply, join_flags, local_reply
from meshproxy.http.codec import (
    CONTINUE_100,
    LAST_CHUNK,
    STATUS_LINES,
    BodyFraming,
    ResponseHead,
    TargetError,
    build_request_head,
    bytes_to_pairs,
    downstream_body_framing,
    encode_chunk,
    lines_to_pairs,
    local_reply_bytes,
    pairs_to_bytes,
    pairs_to_lines,
    parse_target,
    request_head,
    split_authority,
    status_line,
    upstream_request,
    uri_bytes,
)
from meshproxy.http.server import HttpConnection, RequestHead, ServerContext
from meshproxy.mirror import Mirrorer, shadow_request_head
from meshproxy.net.origdst import original_dst
from meshproxy.net.tunnel import TcpTunnel
from meshproxy.settings import Settings
from meshproxy.state import State
from meshproxy.upstream.connection import UpstreamConnection
from meshproxy.upstream.pool import (
    ClusterCounters,
    ClusterState,
    ConnectFailure,
    EndpointState,
    Pools,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from meshproxy.accesslog import AccessLog
    from meshproxy.metrics import Metrics

_monotonic = time.monotonic
# The per-snapshot authority memo holds at most BASE + PER_NAME x (names in the route table)
# entries: every host and alias of a big table fits (as "host" and "host:port"), while Host
# headers a client makes up cannot grow it past a bound set by the snapshot (see lookup).
AUTHORITY_CACHE_BASE = 4096
AUTHORITY_CACHE_PER_NAME = 2
_NO_ROUTE = local_reply(Failure.NO_ROUTE)
_BAD_REQUEST = local_reply(Failure.BAD_REQUEST)
_NONE = BodyFraming.NONE
_LENGTH = BodyFraming.LENGTH
_CHUNKED = BodyFraming.CHUNKED
_CLOSE = BodyFraming.CLOSE
_OVERFLOW = local_reply(Failure.OVERFLOW)
_OVERLOADED = (("x-envoy-overloaded", "true"),)
_ATTEMPT_1 = b"\r\nx-envoy-attempt-count: 1\r\n"
_FAULT_BODY = b"fault filter abort"
_NO_CODES: frozenset[int] = frozenset()
# Envoy's answer when the body outgrows the retry buffer while a retry waits (router.cc)
_RETRY_BUFFER_EXCEEDED = LocalReply(
    507, "-", b"exceeded request buffer limit while retrying upstream"
)
# methods a stale keep-alive connection is retried for at once (RFC 9110 9.2.2)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Istio's clusters for traffic to no known service (outboundTrafficPolicy): ALLOW_ANY forwards
# to the original destination, REGISTRY_ONLY answers 502 from the "block_all" route
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
PASSTHROUGH_LIMIT = 1024  # original destinations with a live passthrough pool at once
_MESH_META = Meta(kind="MeshConfig", name="outboundTrafficPolicy", namespace="")
_ALLOW_ANY = VirtualHost(
    name="allow_any",
    meta=_MESH_META,
    domains=("*",),
    routes=(
        Route(
            name="allow_any",
            meta=_MESH_META,
            clusters=(WeightedCluster(cluster=PASSTHROUGH_CLUSTER, weight=100, host="*"),),
            total_weight=100,
            retries=None,  # Istio's allow_any route: no retry policy, no timeout
            timeout=None,
        ),
    ),
)
BLACKHOLE = Cluster(
    name=BLACKHOLE_CLUSTER, host=BLACKHOLE_CLUSTER, port=0, service_name=BLACKHOLE_CLUSTER
)
# what metrics and the access log see of every passthrough request (bounded label values)
PASSTHROUGH = Cluster(
    name=PASSTHROUGH_CLUSTER, host=PASSTHROUGH_CLUSTER, port=0, service_name=PASSTHROUGH_CLUSTER
)
_BLACKHOLED = LocalReply(502, "NR", b"")
_UNREAD = ("", -1)  # OutboundConnection: SO_ORIGINAL_DST not read yet
_CRLF = (0x0D, 0x0A)  # empty lines may precede a request line (RFC 9112 2.2)
# HTTP/2 with prior knowledge (plaintext gRPC, h2c) opens with this preface (RFC 9113 3.4):
# upper-case like a request line, but not HTTP/1.x, so a redirected one is tunnelled too.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n"


def _is_h2_preface(data: bytes) -> bool:
    """``data`` is (the start of) the HTTP/2 connection preface: at least ``PRI``, so a
    request line cut after its first byte or two (``P``, ``PO``) stays HTTP/1.1."""
    n = min(len(data), len(_H2_PREFACE))
    return n >= 3 and data[:n] == _H2_PREFACE[:n]


TCP_CONNECT_TIMEOUT = ConnectionPool().connect_timeout  # Istio's connectTimeout (10 s)
# attempt failure -> what outlier detection is told (a local-origin failure of this kind)
_LOST = {
    Failure.CONNECT_FAILURE: "connect",
    Failure.TLS_FAILURE: "connect",
    Failure.UPSTREAM_RESET: "reset",
    Failure.UPSTREAM_PROTOCOL_ERROR: "reset",
    Failure.UPSTREAM_TIMEOUT: "timeout",
}


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """For the exchange's timer and pool callbacks (loop-driven, off the request path): a bug
    in one is logged and answered like any internal error, never left to the loop (where the
    exchange would hang) nor raised into another exchange's pool release."""

    def call(self: Exchange, *args: object) -> None:
        try:
            method(self, *args)
        except Exception:
            log.exception("internal error in %s for %r", method.__name__, self)
            self._internal_error()

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


def _ops(ops: HeaderOps) -> HeaderOps | None:
    """``ops`` if it does anything, else None (identity test first: the common case)."""
    if ops is NO_HEADER_OPS or ops.empty:
        return None
    return ops


def _plain(route: Route, wc: WeightedCluster) -> bool:
    """No rewrite and no request header operations: the one-pass request head applies."""
    return (
        route.rewrite is None
        and _ops(route.headers.request) is None
        and _ops(wc.headers.request) is None
    )


class Destination:
    """What an authority resolves to under one snapshot (memoised by :class:`ProxyContext`).

    ``route`` is set when the virtual host's first route matches every request (then no
    :class:`RequestInfo` is needed); ``wc`` / ``cluster_name`` too when that route has a single
    destination (the pick is then the same for every request of this authority), and
    ``plain`` when that pair needs no rewrite or request header operation.
    """

    __slots__ = ("authority_b", "cluster_name", "host", "plain", "port", "route", "vh", "wc")

    def __init__(self, authority: str, host: str, port: int | None, vh: VirtualHost | None):
        self.authority_b = authority.encode("latin-1")
        self.host = host
        self.port = port
        self.vh = vh
        self.route: Route | None = None
        self.wc: WeightedCluster | None = None
        self.cluster_name = ""
        self.plain = False
        first = vh.routes[0] if vh is not None and vh.routes else None
        if first is not None and not first.matches:
            self.route = first
            if len(first.clusters) == 1:
                wc, name = pick_cluster(first, 0.0, port)
                self.wc = wc
                self.cluster_name = name
                self.plain = _plain(first, wc)


def authority_cache_limit(snap: Snapshot) -> int:
    """How many authorities the memo may hold under ``snap``: a fixed allowance plus
    ``AUTHORITY_CACHE_PER_NAME`` per exact name (aliases included) and wildcard suffix."""
    names = len(snap.routes.exact) + len(snap.routes.wildcards)
    return AUTHORITY_CACHE_BASE + AUTHORITY_CACHE_PER_NAME * names


class ProxyContext:
    """Shared by every exchange of a data plane (built once by ``DataPlane``)."""

    __slots__ = (
        "access_log",
        "active_requests",
        "cache",
        "cache_limit",
        "cache_snap",
        "default_budget",
        "loop",
        "metrics",
        "mirrorer",
        "passthrough",
        "passthrough_snap",
        "pools",
        "random",
        "settings",
        "state",
        "tunnels",
    )

    def __init__(
        self,
        state: State,
        pools: Pools,
        metrics: Metrics,
        settings: Settings,
        access_log: AccessLog | None = None,
    ) -> None:
        self.state = state
        self.access_log = access_log
        self.pools = pools
        self.metrics = metrics
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.random = random.random
        self.mirrorer = Mirrorer(pools, settings)
        self.default_budget: RetryBudget | None = (
            None
            if settings.retry_budget_percent is None
            else RetryBudget(settings.retry_budget_percent, settings.retry_budget_min)
        )
        self.active_requests = 0
        self.cache_snap: Snapshot | None = None
        self.cache: dict[str, Destination] = {}
        self.cache_limit = AUTHORITY_CACHE_BASE
        # ALLOW_ANY: original destination -> (pool key, its PassthroughCluster); per snapshot
        self.passthrough: dict[tuple[str, int], tuple[str, Cluster]] = {}
        self.passthrough_snap: Snapshot | None = None
        self.tunnels: set[TcpTunnel] = set()  # open TCP passthrough tunnels (the idle sweep's)

    def lookup(self, snap: Snapshot, authority: str) -> Destination:
        """What ``authority`` resolves to under ``snap``, memoised per snapshot.

        Called by :meth:`Exchange.start` on a memo miss. The memo is bounded by the snapshot's
        size (:func:`authority_cache_limit`), never by what clients send: when a flood of
        made-up Host headers fills it, it is emptied and refilled, so the hosts in real use
        are memoised again after one request each and memory stays bounded.
        """
        if snap is not self.cache_snap:
            self.cache_snap = snap
            self.cache = {}
            self.cache_limit = authority_cache_limit(snap)
        d = self.cache.get(authority)
        if d is None:
            host, port = split_authority(authority)
            d = Destination(authority, host, port, find_virtual_host(snap.routes, host))
            cache = self.cache
            if len(cache) >= self.cache_limit:
                cache.clear()
            cache[authority] = d
        return d

    def passthrough_cluster(self, snap: Snapshot, ip: str, port: int) -> tuple[str, Cluster]:
        """The pool key and ``PassthroughCluster`` for the original destination ``ip:port``
        (made on first use). Pools drop such states at a snapshot swap (the snapshot does not
        name them), so the table is rebuilt per snapshot too; past ``PASSTHROUGH_LIMIT``
        destinations it starts over, closing the idle connections of the old ones."""
        table = self.passthrough
        if snap is not self.passthrough_snap:
            self.passthrough_snap = snap
            table.clear()
        got = table.get((ip, port))
        if got is None:
            if len(table) >= PASSTHROUGH_LIMIT:
                for key, _ in table.values():
                    self.pools.drop(key)
                table.clear()
            host = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            cluster = Cluster(
                name=PASSTHROUGH_CLUSTER,
                host=host,
                port=port,
                endpoints=(Endpoint(address=ip, port=port),),
                service_name=PASSTHROUGH_CLUSTER,
                meta=_MESH_META,
            )
            got = table[(ip, port)] = (f"{PASSTHROUGH_CLUSTER}|{host}", cluster)
        return got

    @property
    def make_exchange(self) -> Callable[[HttpConnection, RequestHead], Exchange]:
        """The connection's exchange factory (a C-level partial: no Python frame per call)."""
        return partial(Exchange, self)

    def record(self, ex: Exchange, code: int, flags: str) -> None:
        """The metrics of a finished request (``reporter="source"``; the inbound listener's
        context reports as the destination)."""
        self.metrics.record_request(
            ex.cluster, code, flags, _monotonic() - ex.head.t0, ex.req_bytes, ex.resp_bytes
        )


class OutboundConnection(HttpConnection):
    """A client connection of the outbound listener. Knows where the client meant to go when
    iptables redirected it here: ``SO_ORIGINAL_DST``, read at most once per connection and
    only when it matters (routed HTTP never pays the system call).

    Its first bytes decide what it is, once: a request line (an upper-case method, but not
    HTTP/2's prior-knowledge preface ``PRI * HTTP/2.0``) makes it an HTTP connection for good
    (the class becomes :class:`_HttpOutbound`, whose ``data_received`` is the HTTP server's
    own: nothing more per read); anything else (TLS, h2c / plaintext gRPC, a database
    protocol) on a redirected connection is tunnelled byte for byte to the original
    destination (:class:`_TunnelOutbound`, Envoy's ``tcp_proxy`` to ``PassthroughCluster``;
    under REGISTRY_ONLY only to a ServiceEntry address, else it is closed). Not redirected, it
    stays HTTP (and gets its 400)."""

    __slots__ = ("_orig", "proxy", "tunnel")

    def __init__(self, ctx: ServerContext, proxy: ProxyContext) -> None:
        if proxy is None:  # the outbound policy (REGISTRY_ONLY) is the proxy's: never fail open
            raise TypeError("OutboundConnection needs its ProxyContext")
        super().__init__(ctx)
        self._orig: tuple[str, int] | None = _UNREAD
        self.proxy = proxy
        self.tunnel: TcpTunnel | None = None

    def original_dst(self) -> tuple[str, int] | None:
        """The redirected connection's original ``(ip, port)``; None if not redirected."""
        orig = self._orig
        if orig is _UNREAD:
            t = self.transport
            orig = self._orig = original_dst(t.get_extra_info("socket") if t else None)
        return orig

    def data_received(self, data: bytes) -> None:
        """The connection's first bytes: the class changes here, and the transport is told
        (uvloop caches the bound ``data_received``), so later reads go straight to the new
        class's method."""
        cls = self.__class__
        if cls is not OutboundConnection:  # a stale cached method: these are not the first bytes
            cls.data_received(self, data)
            return
        b = data[0] if data else 0x41
        if (
            not (0x41 <= b <= 0x5A or b in _CRLF) or (b == 0x50 and _is_h2_preface(data))
        ) and self._tunnel_to_original(data):
            return
        self.__class__ = _HttpOutbound
        self._rebind()
        HttpConnection.data_received(self, data)

    def _rebind(self) -> None:
        """Make the transport look the protocol's methods up again (after a class change)."""
        set_protocol = getattr(self.transport, "set_protocol", None)
        if set_protocol is not None:
            set_protocol(self)

    def _tunnel_to_original(self, data: bytes) -> bool:
        """Not HTTP: tunnel a redirected connection to where it was going; False when it was
        not redirected (then it is parsed as HTTP, and answered 400)."""
        orig = self.original_dst()
        t = self.transport
        if orig is None or t is None:
            return False
        ip, port = orig
        proxy = self.proxy
        if (
            proxy.settings.outbound_traffic_policy == "REGISTRY_ONLY"
            and host_for_address(proxy.state.snapshot.routes, ip, port) is None
        ):
            log.debug("REGISTRY_ONLY: TCP to %s:%d closed (BlackHoleCluster)", ip, port)
            self._no_more = True
            t.close()
            return True
        if self._timer is not None:  # the HTTP idle / head deadlines do not apply to TCP
            self._timer.cancel()
            self._timer = None
        self._no_more = True
        settings = self.ctx.settings
        limits = (settings.high_water, settings.low_water)
        self.tunnel = tunnel = TcpTunnel(t, data, proxy.tunnels.discard, limits)
        proxy.tunnels.add(tunnel)  # the idle sweep's
        self.__class__ = _TunnelOutbound
        self._rebind()
        tunnel.start(ip, port, TCP_CONNECT_TIMEOUT)
        return True


class _HttpOutbound(OutboundConnection):
    """An outbound connection whose first bytes were HTTP: the plain HTTP server from now on."""

    __slots__ = ()
    data_received = HttpConnection.data_received


class _TunnelOutbound(OutboundConnection):
    """An outbound connection tunnelled to its original destination: the client's events
    go to the :class:`~meshproxy.net.tunnel.TcpTunnel`."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        assert self.tunnel is not None
        self.tunnel.client_data(data)

    def eof_received(self) -> bool:
        assert self.tunnel is not None
        return self.tunnel.client_eof()

    def pause_writing(self) -> None:
        self.write_paused = True
        assert self.tunnel is not None
        self.tunnel.client_paused_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        assert self.tunnel is not None
        self.tunnel.client_resumed_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.tunnel is not None
        self.tunnel.close()
        HttpConnection.connection_lost(self, exc)


class Exchange:
    """One request from head to the last byte of its response."""

    __slots__ = (
        "_body_sent",
        "_buf",
        "_buf_size",
        "_codes",
        "_connect_task",
        "_connecting",
        "_down_framing",
        "_flags",
        "_hash_key",
        "_head_req",
        "_held",
        "_held_body",
        "_held_done",
        "_held_up",
        "_holds_down_pause",
        "_holds_up_pause",
        "_in_attempt",
        "_last_failure",
        "_mirrors",
        "_out",
        "_progress",
        "_progress_at",
        "_replay",
        "_replay_size",
        "_retrying",
        "_route_timer",
        "_routed",
        "_routed_in",
        "_stale_retried",
        "_timer",
        "_tried",
        "_try_timer",
        "_up_framing",
        "_waiter",
        "attempts",
        "close_after",
        "cluster",
        "conn",
        "cs",
        "ctx",
        "done",
        "ep",
        "head",
        "req_bytes",
        "req_head",
        "request_complete",
        "request_id",
        "request_sent",
        "resp_bytes",
        "response_started",
        "route",
        "started",
        "status",
        "up",
        "wc",
    )

    def __init__(self, ctx: ProxyContext, conn: HttpConnection, head: RequestHead) -> None:
        self.ctx = ctx
        self.conn = conn
        self.head = head
        self._head_req = head.method_b == b"HEAD"
        self.request_id = b""
        self.started = False
        self.response_started = False
        self.request_complete = False
        self.request_sent = False  # the whole request reached the upstream connection
        self.done = False
        self.close_after = False
        self.status = 0
        self.req_bytes = 0
        self.resp_bytes = 0
        self.route: Route | None = None
        self.wc: WeightedCluster | None = None
        self.cluster: Cluster | None = None
        self.cs: ClusterState | None = None
        self.ep: EndpointState | None = None
        self.up: UpstreamConnection | None = None
        self.req_head = b""
        self._buf: list[bytes] | None = None  # body pieces waiting for the upstream connection
        self._buf_size = 0
        self._holds_down_pause = 0  # pause_reading calls on the client we must undo
        self._holds_up_pause = False
        self._connect_task: asyncio.Task[None] | None = None
        # endpoint whose reserved connection slot the connect task has not taken over yet
        self._connecting: EndpointState | None = None
        self._up_framing = _NONE
        self._down_framing = _NONE
        self._out: list[bytes] | None = None  # response bytes produced during one upstream read
        self.attempts = 0  # upstream attempts started (1 + retries)
        self._codes: frozenset[int] = _NO_CODES  # the route's bare retryOn codes
        self._flags: list[str] | None = None  # response flags gathered on the way (DI, URX..)
        self._hash_key: bytes | None = None
        # a retriable response held (upstream reading paused) until its retry is admitted by
        # the budget at the end of the backoff; sent to the client if the budget refuses
        self._held: tuple[int, ResponseHead] | None = None
        self._held_body: list[bytes] | None = None  # allocated when a response is held
        self._held_done: bool | None = None  # the held response is complete (keep-alive?)
        # the held response's connection (self.up is None meanwhile: request body pieces are
        # buffered, not written to it; released to the pool once the response is complete)
        self._held_up: UpstreamConnection | None = None
        self._last_failure: Failure | None = None  # of the last failed attempt, for a reply
        self._progress = -1  # stream idle check: bytes + attempts at the last look, and when
        self._progress_at = 0.0
        self._in_attempt = False  # counted in the endpoint's / cluster's active requests
        # the next / current attempt is a retry (counted in retries_active while in flight)
        self._retrying = False
        self._tried: list[EndpointState] | None = None  # endpoints tried, once retrying
        self._routed = False  # the router started (after any fault delay)
        self._routed_in: ClusterCounters | None = None  # counted in its rq_routed until _finish
        self._stale_retried = False
        self._body_sent = False  # some request body bytes went to an upstream
        # copies of the upstream-encoded body pieces, for retries and mirrors (None: off or
        # over Settings.retry_buffer_bytes)
        self._replay: list[bytes] | None = None
        self._replay_size = 0
        self._mirrors: list[Cluster] | None = None
        self._route_timer: asyncio.TimerHandle | None = None  # route `timeout`
        self._try_timer: asyncio.TimerHandle | None = None  # perTryTimeout / pending deadline
        self._timer: asyncio.TimerHandle | None = None  # backoff / fault delay
        self._waiter: Callable[[UpstreamConnection | None], None] | None = None

    # ------------------------------------------------------------------ start: decide

    def start(self) -> None:
        """Called by the connection when this request is at the front of the queue. A bug
        below (never a user mistake) is logged and answered ``500`` instead of killing the
        client's transport."""
        try:
            self._start()
        except Exception:
            log.exception("internal error while starting a request: %r", self.head)
            self._internal_error()

    def _drop_upstream(self) -> None:
        """Abort the upstream connection (never pooled again) or the connect in progress."""
        up = self.up
        self.up = None
        if up is not None:
            up.abort()
        if self._connect_task is not None:
            self._connect_task.cancel()
            self._connect_task = None
        connecting = self._connecting
        if connecting is not None:  # cancelled before it ran: give the slot back
            self._connecting = None
            connecting.connection_closed()

    def _internal_error(self) -> None:
        if self.done:
            return
        self._drop_upstream()
        if self.response_started:
            self._finish(self.status, "-")
            self.conn.abort()
            return
        try:
            self._local(local_reply(Failure.INTERNAL))
        except Exception:
            log.exception("internal error while answering a request")
            self.conn.abort()

    def _start(self) -> None:
        self.started = True
        ctx = self.ctx
        ctx.active_requests += 1
        head = self.head
        conn = self.conn
        target = head.target_b
        if target[:1] == b"/":
            if b"#" in target:  # a fragment is never sent (nor routed on)
                target = head.target_b = target[: target.index(b"#")]
            scheme: str | None = None
            authority = head.host or ""
            path: str | None = None  # decoded only when routing needs it
        else:
            try:
                scheme, url_authority, path = parse_target(head.target)
            except TargetError:
                self._local(_BAD_REQUEST)
                return
            authority = url_authority if url_authority is not None else head.host or ""
            target = path.encode("latin-1")
        snap = ctx.state.snapshot
        d = ctx.cache.get(authority) if snap is ctx.cache_snap else None
        if d is None:
            d = ctx.lookup(snap, authority)
        vh = d.vh
        if vh is None:
            d = self._by_original_dst(snap, authority)
            if d is None:
                return
            vh = d.vh
            assert vh is not None
        req: RequestInfo | None = None
        route = d.route
        match = None
        if route is None:
            if path is None:
                path = head.target
            req = RequestInfo(
                head.method, path, d.host, d.port, scheme or conn.scheme, head.map, authority
            )
            sel = select_route(vh, req)
            if sel is None:
                self._local(_NO_ROUTE)
                return
            route, match = sel
        self.route = route
        if route.direct_response is not None:
            dr = route.direct_response
            self._local(LocalReply(dr.status, "-", dr.body or b""), route=route)
            return
        if route.redirect is not None:
            if req is None:
                if path is None:
                    path = head.target
                req = RequestInfo(
                    head.method, path, d.host, d.port, scheme or conn.scheme, head.map, authority
                )
            status, location = redirect_response(route.redirect, req, match)
            if not location.isascii():
                location = uri_bytes(location).decode("ascii")
            self._local(LocalReply(status, "-"), extra=(("location", location),), route=route)
            return
        if not route.clusters:
            self._local(_NO_ROUTE)
            return
        if route is d.route and d.wc is not None:
            wc, cname, plain = d.wc, d.cluster_name, d.plain
        else:
            wc, cname = pick_cluster(route, ctx.random(), d.port)
            plain = _plain(route, wc)
        self.wc = wc
        cluster = snap.clusters.get(cname)
        if cluster is not None:
            self.cluster = cluster
            self.cs = ctx.pools.cluster_state(cluster)
        else:
            cluster = self._passthrough(snap) if cname is PASSTHROUGH_CLUSTER else None
            if cluster is None:
                self._local(local_reply(Failure.NO_CLUSTER))
                return
        if cluster.lb.hash is not None:
            if req is None:
                if path is None:
                    path = head.target
                req = RequestInfo(
                    head.method, path, d.host, d.port, scheme or conn.scheme, head.map, authority
                )
            self._hash_key = hash_key_for(cluster.lb.hash, req, conn.peer_ip)

        # the upstream request head
        if plain:
            self.req_head, self.request_id = build_request_head(
                head.method_b,
                target,
                head.headers,
                host=d.authority_b if authority else cluster.host.encode("latin-1"),
                client_ip=conn.peer_ip_b,
                scheme=conn.scheme_b if scheme is None else scheme.encode("latin-1"),
                framing=head.framing,
                content_length=head.content_length,
                drop=head.drop,
            )
        else:
            if path is None:
                path = head.target
            self.req_head = self._general_head(route, wc, match, authority, scheme, path)
        if head.framing is _NONE:
            self.request_complete = True  # llhttp may not have called on_message_complete yet
        elif (route.retries is not None and route.retries.attempts > 0) or route.mirrors:
            # body pieces that arrived with the head (before start) are only in _buf: the
            # replay buffer starts with them, or is off if they already exceed its cap
            buf = self._buf
            if buf is None:
                self._replay = []
            elif self._buf_size <= ctx.settings.retry_buffer_bytes:
                self._replay = list(buf)
                self._replay_size = self._buf_size
        rp = route.retries
        if rp is not None and rp.retriable_status_codes:
            self._codes = rp.retriable_status_codes
        if route.mirrors:
            self._pick_mirrors(route, snap)
        fault = route.fault
        if fault is not None and self._inject_fault(fault):
            return
        if head.expect_continue and head.http11 and not self.request_complete:
            conn.write(CONTINUE_100)
        self._route()

    def _by_original_dst(self, snap: Snapshot, authority: str) -> Destination | None:
        """The Host names no route. If iptables redirected the connection, route by where it
        was going: the ServiceEntry whose ``addresses`` hold the original ``ip:port``, else
        ``ALLOW_ANY`` passthrough to it, or ``REGISTRY_ONLY``'s 502. Otherwise (a client that
        came to the listener itself) ``404 NR``. None when the request was answered here."""
        conn = self.conn
        orig = conn.original_dst() if isinstance(conn, OutboundConnection) else None
        if orig is None:
            self._local(_NO_ROUTE)
            return None
        ip, port = orig
        host = host_for_address(snap.routes, ip, port)
        if host is not None:
            vh = find_virtual_host(snap.routes, host)
            if vh is not None:
                return Destination(authority, split_authority(authority)[0], port, vh)
        if self.ctx.settings.outbound_traffic_policy == "REGISTRY_ONLY":
            self.cluster = BLACKHOLE
            self._local(_BLACKHOLED)
            return None
        return Destination(authority, split_authority(authority)[0], port, _ALLOW_ANY)

    def _passthrough(self, snap: Snapshot) -> Cluster | None:
        """The passthrough cluster of this redirected connection's original destination (the
        allow_any route chose it, see :meth:`_by_original_dst`), its pool state in
        ``self.cs``. ``self.cluster``, which metrics and the access log read, is the one
        shared :data:`PASSTHROUGH`: one series and label set for every destination, as
        Istio's single ``PassthroughCluster``, whatever the number of destinations."""
        conn = self.conn
        orig = conn.original_dst() if isinstance(conn, OutboundConnection) else None
        if orig is None:
            return None
        key, cluster = self.ctx.passthrough_cluster(snap, orig[0], orig[1])
        self.cs = self.ctx.pools.keyed_state(key, cluster)
        self.cluster = PASSTHROUGH
        return cluster

    def _general_head(
        self,
        route: Route,
        wc: WeightedCluster,
        match: Match | None,
        authority: str,
        scheme: str | None,
        path: str,
    ) -> bytes:
        """The upstream request head with a rewrite and / or header operations."""
        head = self.head
        cluster = self.cluster
        assert cluster is not None
        rw = route.rewrite
        up_authority = rw.authority if rw is not None and rw.authority else authority
        if not up_authority:
            up_authority = cluster.host
        ureq = upstream_request(
            head.headers,
            host=up_authority,
            client_ip=self.conn.peer_ip,
            scheme=scheme or self.conn.scheme,
        )
        self.request_id = ureq.request_id
        headers = ureq.headers
        if rw is not None:
            new_path = rewritten_path(route, match, path)
            if new_path is not None:
                headers.append((b"x-envoy-original-path", path.encode("latin-1")))
                path = new_path
        # Envoy's order: the destination's (weighted cluster's) operations, then the route's,
        # so a route-level `set` wins over a destination-level one.
        wq = _ops(wc.headers.request)
        rq = _ops(route.headers.request)
        if rq is not None or wq is not None:
            pairs = bytes_to_pairs(headers)
            if wq is not None:
                pairs = apply_header_ops(pairs, wq)
            if rq is not None:
                pairs = apply_header_ops(pairs, rq)
            headers = pairs_to_bytes(pairs)
        return request_head(head.method, path, headers, head.framing, head.content_length)

    # ------------------------------------------------------------------ fault, mirrors

    def _inject_fault(self, fault: FaultPolicy) -> bool:
        """Istio's fault filter, before the router: a delay (``DI``) then an abort (``FI``).
        Returns whether the fault took the request over (delayed or answered)."""
        rand = self.ctx.random
        abort = fault.abort_status is not None and rand() < fault.abort_fraction
        if fault.delay is not None and rand() < fault.delay_fraction:
            self._flag("DI")
            self._timer = self.ctx.loop.call_later(fault.delay, self._after_delay, abort)
            return True
        if abort:
            self._fault_abort()
            return True
        return False

    @_guarded
    def _after_delay(self, abort: bool) -> None:
        self._timer = None
        if self.done:
            return
        if abort:
            self._fault_abort()
            return
        head = self.head
        if head.expect_continue and head.http11 and not self.request_complete:
            self.conn.write(CONTINUE_100)
        self._route()

    def _fault_abort(self) -> None:
        fault = self.route.fault if self.route is not None else None
        assert fault is not None and fault.abort_status is not None
        self._local(LocalReply(fault.abort_status, "FI", _FAULT_BODY))

    def _pick_mirrors(self, route: Route, snap: Snapshot) -> None:
        """Decide which mirrors get a copy of this request (each by its own percentage)."""
        rand = self.ctx.random
        for m in route.mirrors:
            if m.fraction >= 1.0 or rand() < m.fraction:
                cluster = snap.clusters.get(m.cluster)
                if cluster is not None:
                    if self._mirrors is None:
                        self._mirrors = []
                    self._mirrors.append(cluster)

    def _send_mirrors(self) -> None:
        """The whole request is here: hand the copies to the mirrorer (fire and forget)."""
        mirrors = self._mirrors
        self._mirrors = None
        if not mirrors:
            return
        mirrorer = self.ctx.mirrorer
        replay = self._replay
        if replay is None and self.head.framing is not _NONE:
            mirrorer.dropped += len(mirrors)  # body over the buffer: no faithful copy
            return
        body = b"".join(replay) if replay else b""
        head = shadow_request_head(self._head_for(1))
        route = self.route
        st = self.ctx.settings
        timeout = route.timeout if route is not None and route.timeout else st.mirror_timeout
        clusters = self.ctx.state.snapshot.clusters
        for cluster in mirrors:
            # the definition in force now (a reload during a slow upload may have changed it)
            current = clusters.get(cluster.name)
            if current is not None:
                mirrorer.send(current, head, body, timeout)

    # ------------------------------------------------------------------ the router

    def _route(self) -> None:
        """The router starts: timers that start with it, mirrors, the first attempt."""
        self._routed = True
        if self.request_complete:
            self._request_done_routed()
        self._attempt()

    def _request_done_routed(self) -> None:
        """The request is complete and the router runs: Envoy's global timeout starts now
        (and the mirrors have the whole body)."""
        route = self.route
        if route is not None and route.timeout and self._route_timer is None:
            self._route_timer = self.ctx.loop.call_later(route.timeout, self._on_route_timeout)
        if self._mirrors is not None:
            self._send_mirrors()

    def _head_for(self, attempt: int) -> bytes:
        """The upstream request head with ``x-envoy-attempt-count: attempt``."""
        if attempt == 1:
            return self.req_head
        return self.req_head.replace(_ATTEMPT_1, b"\r\nx-envoy-attempt-count: %d\r\n" % attempt, 1)

    def _attempt(self, same_ep: bool = False) -> None:
        """One upstream attempt: pick an endpoint (avoiding those a retry already tried),
        then a pooled connection now, a connect in the background, or a place in the
        endpoint's queue when ``max_connections`` is reached."""
        cs = self.cs
        assert cs is not None
        counters = cs.counters
        pool = cs.cluster.pool
        if counters.rq_active >= pool.max_requests:
            self._overflow()
            return
        ctx = self.ctx
        if self._tried is not None or same_ep:
            # a retry (or a replay) picks from the cluster as it is now, not as it was when
            # the request started: a reload may have changed its endpoints meanwhile
            current = ctx.pools.states().get(cs.name)
            if current is not None and current is not cs:
                self.cs = cs = current
        if same_ep and self.ep is not None and not self.ep.removed:
            ep = self.ep
        elif self._tried is not None:  # a retry: Envoy's previous_hosts predicate
            ep = cs.pick(ctx.random(), self._hash_key, self._tried)
        else:
            ep = cs.single or cs.pick(ctx.random(), self._hash_key)
        if ep is None:
            self._local(local_reply(Failure.NO_HEALTHY_UPSTREAM))
            return
        tried = self._tried
        if tried is not None and ep not in tried:
            tried.append(ep)
        self.ep = ep
        if self._routed_in is None:
            counters.rq_routed += 1  # until _finish
            self._routed_in = counters
        if not same_ep:
            self.attempts += 1
        ep.active += 1
        counters.rq_active += 1
        if self._retrying:
            n = counters.retries_active = counters.retries_active + 1
            if n > counters.retries_peak:
                counters.retries_peak = n
        self._in_attempt = True
        idle = ep.idle  # Pools.take_idle, inlined: the most recent live keep-alive connection
        # The stale keep-alive replay opens a new connection when the pool limit allows:
        # connections pooled together may have gone stale together (an upstream restart).
        fresh = same_ep and cs.can_connect(ep)
        while idle and not fresh:
            up = idle.pop()
            if not up.closed:
                self._send_on(up)
                return
        if cs.can_connect(ep):
            self._start_connect(cs, ep)
            return
        if counters.rq_pending >= pool.max_pending_requests:
            self._end_attempt()
            self._overflow()
            return
        counters.rq_pending += 1
        self._waiter = waiter = self._on_connection_ready
        ep.waiters.append(waiter)
        # a pending attempt waits at most the connect timeout for a connection
        self._try_timer = ctx.loop.call_later(pool.connect_timeout, self._on_pending_timeout)

    @_guarded
    def _on_connection_ready(self, up: UpstreamConnection | None) -> None:
        """The pool's answer to a waiting attempt: a released connection, or None (a
        connection slot is free: connect)."""
        self._waiter = None
        if self._try_timer is not None:
            self._try_timer.cancel()
            self._try_timer = None
        cs = self.cs
        if self.done or cs is None:
            if up is not None and cs is not None:
                self.ctx.pools.release(up, True, cs)
            return
        if up is not None:
            self._send_on(up)
            return
        assert self.ep is not None
        self._start_connect(cs, self.ep)

    def _forget_waiter(self) -> None:
        w = self._waiter
        if w is None:
            return
        self._waiter = None
        ep = self.ep
        if ep is not None:
            try:
                ep.waiters.remove(w)
            except ValueError:
                return
            if ep.counters is not None:
                ep.counters.rq_pending -= 1

    @_guarded
    def _on_pending_timeout(self) -> None:
        self._try_timer = None
        if self.done:
            return
        self._forget_waiter()
        self._end_attempt()
        self._overflow()

    def _overflow(self) -> None:
        """A connection-pool limit refused the attempt: 503 ``UO`` with
        ``x-envoy-overloaded`` at once (never retried)."""
        cs = self.cs
        if cs is not None:
            self.ctx.metrics.upstream_overflow(cs.name)
        self._local(_OVERFLOW, extra=_OVERLOADED)

    def _start_connect(self, cs: ClusterState, ep: EndpointState) -> None:
        """Connect in the background; the connection's slot is counted now (``reserve``), not
        when the task first runs, so attempts decided in the same loop turn see it."""
        self.ctx.pools.reserve(cs, ep)
        self._connecting = ep
        self._connect_task = self.ctx.loop.create_task(self._connect(cs, ep))

    async def _connect(self, cs: ClusterState, ep: EndpointState) -> None:
        self._connecting = None  # the reservation is Pools.connect's from here on
        try:
            up = await self.ctx.pools.connect(cs, ep, reserved=True)
        except ConnectFailure as e:
            self._connect_task = None
            if not self.done:
                self._attempt_failed(Failure.TLS_FAILURE if e.tls else Failure.CONNECT_FAILURE)
            return
        self._connect_task = None
        if self.done:
            self.ctx.pools.release(up, True, cs)  # unused, still good for the next request
            return
        self._send_on(up)

    def _send_on(self, up: UpstreamConnection) -> None:
        self.up = up
        up.bind(self, self._head_req)
        self._holds_up_pause = False  # about an earlier attempt's connection, if any
        if self.conn.write_paused:  # the client is still behind on an earlier response
            self.downstream_pause_writing()
        head = self.req_head if self.attempts == 1 else self._head_for(self.attempts)
        replay = self._replay
        buf = self._buf
        if replay:
            # everything received so far (what _buf holds is in the replay buffer too)
            self._buf = None
            self._buf_size = 0
            self._body_sent = True
            up.write(b"".join([head, *replay]))
        elif buf:
            self._buf = None
            self._buf_size = 0
            self._body_sent = True
            up.write(b"".join([head, *buf]))
        else:
            up.write(head)
        if buf or replay:
            while self._holds_down_pause:
                self._holds_down_pause -= 1
                self.conn.resume_reading()
        if self.request_complete:
            self.request_sent = True
            self._arm_try_timer()

    def _arm_try_timer(self) -> None:
        """perTryTimeout: from the moment the whole request is on its way upstream until
        the response head arrives."""
        route = self.route
        rp = route.retries if route is not None else None
        if (
            rp is not None
            and rp.per_try_timeout
            and self._try_timer is None
            and self._in_attempt
            and self.up is not None
        ):
            self._try_timer = self.ctx.loop.call_later(rp.per_try_timeout, self._on_try_timeout)

    def _cancel_try_timer(self) -> None:
        t = self._try_timer
        if t is not None:
            self._try_timer = None
            t.cancel()

    def _end_attempt(self) -> None:
        """The current attempt (or the retry waiting for its backoff) is over: release its
        counts. A retry is in ``retries_active`` while its attempt is in flight: the load it
        adds to the upstream (Envoy counts a retry only while it waits out its backoff)."""
        cs = self.cs
        retrying = self._retrying
        self._retrying = False
        if not self._in_attempt:
            return
        self._in_attempt = False
        self._cancel_try_timer()
        self._forget_waiter()
        ep = self.ep
        if ep is not None:
            ep.active -= 1
        if cs is not None:
            cs.counters.rq_active -= 1
            if retrying:
                cs.counters.retries_active -= 1

    @_guarded
    def _on_try_timeout(self) -> None:
        self._try_timer = None
        if self.done or self.response_started:
            return
        self._drop_upstream()
        self._attempt_failed(Failure.UPSTREAM_TIMEOUT)

    @_guarded
    def _on_route_timeout(self) -> None:
        """Route ``timeout``: it covers every attempt and backoff. 504 ``UT`` when nothing
        was sent to the client yet, else the client connection is reset (flag ``UT``)."""
        self._route_timer = None
        if self.done:
            return
        if not self.response_started and self._in_attempt and self._waiter is None:
            self._report_local(Failure.UPSTREAM_TIMEOUT)
        self._drop_upstream()
        self._end_attempt()
        if self.response_started:
            self._finish(self.status, "UT")
            self.conn.abort()
            return
        self._local(local_reply(Failure.UPSTREAM_TIMEOUT))

    def _report_local(self, failure: Failure) -> None:
        """Tell outlier detection about a local-origin failure of the current endpoint."""
        cs = self.cs
        ep = self.ep
        if cs is None or ep is None or cs.detector is None or ep.removed:
            return
        if ep.index >= len(cs.endpoints) or cs.endpoints[ep.index] is not ep:
            return  # the cluster was redefined meanwhile: this state's indexes are stale
        ej = cs.detector.on_local_failure(ep.index, _LOST[failure], _monotonic())
        if ej is not None:
            self.ctx.pools.ejected(cs, ep, ej.reason, ej.duration)

    def _attempt_failed(self, failure: Failure) -> None:
        """Every failed attempt lands here (no response byte went to the client): outlier
        accounting, then a retry if the policy, the attempts left, the body and the retry
        budget allow it, else the local reply for ``failure``."""
        self._report_local(failure)
        self._end_attempt()
        if failure is Failure.CONNECT_FAILURE or failure is Failure.TLS_FAILURE:
            outcome = Outcome.CONNECT_FAILURE
        elif failure is Failure.UPSTREAM_TIMEOUT:
            outcome = Outcome.PER_TRY_TIMEOUT
        else:
            # on HTTP/1.1 the head went out when the attempt got its connection: bytes of the
            # request reached the upstream, which is not "reset before request" in Envoy's sense
            # (no byte sent: here, only a failed connect)
            outcome = Outcome.RESET
        if self._should_retry(outcome):
            self._last_failure = failure
            self._schedule_retry()
            return
        self._local(local_reply(failure, self.attempts > 1))

    def _should_retry(self, outcome: Outcome, status: int = 0, overloaded: bool = False) -> bool:
        """Envoy's order: the policy's conditions, then the attempts left (``URX`` when
        none); the retry budget / ``maxRetries`` is asked when the backoff ends
        (:meth:`_retry`)."""
        route = self.route
        rp = route.retries if route is not None else None
        if rp is None or rp.attempts <= 0 or self.done or self.response_started:
            return False
        if not retriable(rp, outcome, status, overloaded=overloaded) and not (
            status == 503
            and not overloaded
            and self.ctx.settings.default_retry_503
            and self.head.method_b in _IDEMPOTENT
            and outcome is Outcome.RESPONSE
            and rp == DEFAULT_RETRY
        ):
            return False
        if self.attempts > rp.attempts:
            self._flag("URX")
            return False
        if self._replay is None and self._body_sent:
            return False  # the body went out and was too large to keep: not replayable
        return True

    def _schedule_retry(self) -> None:
        """Start the retry after a full-jitter backoff, if the budget admits it then."""
        cs = self.cs
        assert cs is not None
        if self._tried is None and self.ep is not None:
            self._tried = [self.ep]
        self._retrying = True
        st = self.ctx.settings
        delay = backoff(
            self.attempts, self.ctx.random(), st.retry_backoff_base, st.retry_backoff_max
        )
        self.status = 0
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.ctx.loop.call_later(delay, self._retry)

    @_guarded
    def _retry(self) -> None:
        """The backoff is over. The retry budget (or ``maxRetries``) admits the retry only if
        the retries *in flight* stay within it: retries count while their attempt loads the
        upstream, not while they wait (Envoy counts the wait instead, which makes a 3-retry
        minimum bite at a few hundred failures a second). Refused: the failure goes to the
        client -- the held response, or the local reply -- flagged ``UO``."""
        self._timer = None
        if self.done:
            return
        cs = self.cs
        assert cs is not None
        c = cs.counters
        cluster = cs.cluster
        if not retry_allowed(
            c.retries_active,
            c.rq_routed,
            0,  # rq_routed counts the requests waiting for a connection already
            cluster.retry_budget,
            self.ctx.default_budget,
            cluster.pool.max_retries,
        ):
            self.ctx.metrics.upstream_retry_overflow(cs.name)
            self._flag("UO")
            self._retrying = False
            if self._held is not None:
                self._release_held()
            else:
                failure = self._last_failure or Failure.UPSTREAM_RESET
                self._local(local_reply(failure, self.attempts > 1))
            return
        if self._held is not None:
            self._drop_held()
        self.ctx.metrics.upstream_retry(cs.name)
        self._attempt()

    def _drop_held(self) -> None:
        """The held response is not wanted (its retry goes ahead, or the request ended). A
        complete one gave its connection back already; an incomplete one's is reset."""
        self._held = None
        self._held_body = None
        self._held_done = None
        up = self._held_up
        self._held_up = None
        if up is not None:
            up.abort()

    def _release_held(self) -> None:
        """The budget refused the retry: the held response goes to the client after all."""
        held = self._held
        assert held is not None
        body, done = self._held_body, self._held_done
        up = self._held_up
        self._held = None
        self._held_body = None
        self._held_done = None
        self._held_up = None
        if up is not None:
            # the response continues on its connection, which also gets the request body
            # that arrived during the hold (the upstream may still be reading it)
            self.up = up
            self._holds_up_pause = True  # paused since the hold
            buf = self._buf
            if buf:
                self._buf = None
                self._buf_size = 0
                self._body_sent = True
                up.write(b"".join(buf))
                while self._holds_down_pause:
                    self._holds_down_pause -= 1
                    self.conn.resume_reading()
            if self.request_complete:
                self.request_sent = True
        self._begin_response(*held)
        for piece in body or ():
            self.on_response_body(piece)
        if done is not None:
            self.on_response_complete(done)  # its connection went back to the pool already
            return
        self.flush_response()
        if up is not None and not self.conn.write_paused:
            self._holds_up_pause = False
            up.resume_reading()

    def _flag(self, flag: str) -> None:
        flags = self._flags
        if flags is None:
            self._flags = [flag]
        elif flag not in flags:
            flags.append(flag)

    # ------------------------------------------------------------------ request body

    def on_request_body(self, data: bytes) -> None:
        """Parser callback (via the connection): a piece of the request body."""
        self.req_bytes += len(data)
        if self.done:
            return  # answered already: the rest of the body is read and dropped
        if self.head.framing is _CHUNKED:
            data = encode_chunk(data)
        replay = self._replay
        if replay is not None:
            self._replay_size += len(data)
            if self._replay_size > self.ctx.settings.retry_buffer_bytes:
                self._replay = None  # too large to replay: no retry once it is sent
                if self.up is None and self._body_sent:
                    # between a failed attempt that sent part of the body and its retry: the
                    # retry could only send the tail, so the request ends here (as Envoy)
                    self._drop_upstream()
                    self._local(_RETRY_BUFFER_EXCEEDED)
                    return
            else:
                replay.append(data)
        up = self.up
        if up is not None:
            self._body_sent = True
            up.write(data)
            return
        buf = self._buf
        if buf is None:
            buf = self._buf = []
        buf.append(data)
        self._buf_size += len(data)
        if self._buf_size > self.ctx.settings.high_water and not self._holds_down_pause:
            self._holds_down_pause += 1
            self.conn.pause_reading()

    def on_request_complete(self) -> None:
        """Parser callback: the request (head and body) has been fully received."""
        if self.request_complete and self.head.framing is _NONE:
            return
        self.request_complete = True
        if self.done:
            return
        if self.head.framing is _CHUNKED:
            if self._replay is not None:
                self._replay.append(LAST_CHUNK)
            up = self.up
            if up is not None:
                up.write(LAST_CHUNK)
            else:
                if self._buf is None:
                    self._buf = []
                self._buf.append(LAST_CHUNK)
        if self._routed:
            self._request_done_routed()
        if self.up is not None:
            self.request_sent = True
            self._arm_try_timer()

    def on_request_error(self, status: int) -> bool:
        """The request's framing broke: reset the upstream so it never sees a complete
        request. Returns whether the response had started (the client is then reset)."""
        self._drop_upstream()
        started = self.response_started
        self._finish(self.status if started else status, "DPE")
        return started

    def on_downstream_lost(self) -> None:
        """The client connection closed before this exchange was done."""
        if self.done:
            return
        self._drop_upstream()
        self._finish(self.status, "DC")

    # ------------------------------------------------------------------ response

    def on_response_head(self, status: int, rh: ResponseHead) -> None:
        """Called by the upstream connection with the final response head (already filtered):
        decides the framing towards the client and starts the response bytes -- unless the
        status is one the retry policy retries, then the attempt is abandoned instead."""
        if self._try_timer is not None:
            self._cancel_try_timer()
        cs = self.cs
        if cs is not None and cs.detector is not None:
            self._report_status(cs, status)
        if status >= 409 or status in self._codes:
            if self._retry_response(status, rh):
                return
        self._begin_response(status, rh)

    def _begin_response(self, status: int, rh: ResponseHead) -> None:
        """The response head goes to the client: framing, header operations, status line."""
        head = self.head
        cl = rh.content_length
        # upstream_body_framing(), inlined: RFC 9112 6.3
        if self._head_req or status < 200 or status == 204 or status == 304:
            upf = _NONE
        elif rh.chunked:
            upf = _CHUNKED
        elif cl is not None:
            upf = _LENGTH
        else:
            upf = _CLOSE
        http11 = head.http11
        if upf is _LENGTH or upf is _NONE:
            downf, must_close = upf, False
        else:
            downf, must_close = downstream_body_framing(upf, http11)
        self._up_framing = upf
        self._down_framing = downf
        close = must_close or not head.keep_alive or not self.request_complete or self.conn.draining
        self.close_after = close
        lines = rh.lines
        route = self.route
        wc = self.wc
        if (route is not None and route.headers is not NO_HEADERS) or (
            wc is not None and wc.headers is not NO_HEADERS
        ):
            ws = _ops(wc.headers.response) if wc is not None else None
            rs = _ops(route.headers.response) if route is not None else None
            if rs is not None or ws is not None:
                # Envoy's order: the destination's operations, then the route's.
                pairs = lines_to_pairs(lines)
                if ws is not None:
                    pairs = apply_header_ops(pairs, ws)
                if rs is not None:
                    pairs = apply_header_ops(pairs, rs)
                lines = pairs_to_lines(pairs)
        self.status = status
        self.response_started = True
        # Sent at the end of this upstream read together with whatever body came with it:
        # one write (one syscall) per upstream read instead of one per parser callback.
        out = [STATUS_LINES.get((status, http11)) or status_line(status, http11)]
        out += lines
        if downf is _LENGTH:
            out.append(b"content-length: %d\r\n" % cl)
        elif downf is _CHUNKED:
            out.append(b"transfer-encoding: chunked\r\n")
        elif cl is not None and upf is _NONE and status != 204 and status >= 200:
            out.append(b"content-length: %d\r\n" % cl)  # HEAD / 304: the length it would have
        if close:
            out.append(b"connection: close\r\n\r\n")
        elif not http11:
            out.append(b"connection: keep-alive\r\n\r\n")
        else:
            out.append(b"\r\n")
        self._out = out

    def _report_status(self, cs: ClusterState, status: int) -> None:
        det = cs.detector
        ep = self.ep
        if det is None or ep is None or ep.removed:
            return
        i = ep.index
        if i >= len(cs.endpoints) or cs.endpoints[i] is not ep:
            return  # the cluster was redefined meanwhile: this state's indexes are stale
        ej = det.on_status(i, status, _monotonic())
        if ej is not None:
            self.ctx.pools.ejected(cs, ep, ej.reason, ej.duration)

    def _retry_response(self, status: int, rh: ResponseHead) -> bool:
        """A retriable response status: end this attempt and hold the response (reading its
        connection paused) through the backoff; :meth:`_retry` then drops it for the retry,
        or sends it if the budget refuses. Never for a response carrying
        ``x-envoy-overloaded``."""
        overloaded = any(line.startswith(b"x-envoy-overloaded:") for line in rh.lines)
        if not self._should_retry(Outcome.RESPONSE, status, overloaded):
            return False
        self._held = (status, rh)
        self._held_body = []
        self._held_done = None
        up = self._held_up = self.up
        self.up = None
        if up is not None and not self._holds_up_pause:
            up.pause_reading()
        self._holds_up_pause = False
        self._end_attempt()
        self._schedule_retry()
        return True

    def on_response_body(self, data: bytes) -> None:
        held_body = self._held_body
        if held_body is not None:  # a held response (the list exists only then)
            held_body.append(data)
            return
        self.resp_bytes += len(data)
        if self._down_framing is _CHUNKED:
            if data:
                data = encode_chunk(data)
            else:
                return
        elif self._down_framing is _NONE:
            return
        out = self._out
        if out is None:
            self._out = [data]
        else:
            out.append(data)

    def flush_response(self) -> None:
        """Called by the upstream connection after each read: write what it produced."""
        if self._held is not None:
            return
        out = self._out
        if out:
            self._out = None
            self.conn.write(b"".join(out))

    def on_response_complete(self, keep_alive: bool) -> None:
        if self._held is not None:
            # the held response is all here: its connection goes back to the pool now
            self._held_done = keep_alive
            up = self._held_up
            self._held_up = None
            if up is not None and self.cs is not None:
                up.resume_reading()
                self.ctx.pools.release(up, keep_alive and self.request_sent, self.cs)
            return
        if not self.response_started:  # a message end without a head: never a response
            up = self.up
            if up is not None:
                up.abort()
            self.on_upstream_lost(Failure.UPSTREAM_PROTOCOL_ERROR)
            return
        if self._down_framing is _CHUNKED:
            out = self._out
            if out is None:
                self._out = [LAST_CHUNK]
            else:
                out.append(LAST_CHUNK)
        self.flush_response()
        up = self.up
        self.up = None
        if up is not None and self.cs is not None:
            if self._holds_up_pause:
                self._holds_up_pause = False
                up.resume_reading()
            self.ctx.pools.release(up, keep_alive and self.request_sent, self.cs)
        self._finish(self.status, "-")
        self.conn.exchange_done(self, self.close_after or self._down_framing is _CLOSE)

    def on_upstream_lost(self, failure: Failure) -> None:
        if self._held is not None:
            # the held response was cut short: its retry still decides, a refusal answers
            # like a reset
            self._held = None
            self._held_body = None
            self._held_done = None
            self._held_up = None
            self._last_failure = failure
            return
        up = self.up
        self.up = None
        if self.done:
            return
        if not self.response_started:
            if (
                up is not None
                and up.requests > 1
                and up.clean_eof
                and failure is Failure.UPSTREAM_RESET
                and not self._stale_retried
                and self.head.method_b in _IDEMPOTENT
                and (self._replay is not None or not self._body_sent)
            ):
                # A reused keep-alive connection the upstream closed as we sent on it (FIN,
                # no response byte): the request was not processed. Send it again at once on
                # a new connection to the same endpoint (RFC 9112 9.3.1 allows this for
                # idempotent requests; it is not counted as a retry).
                self._stale_retried = True
                retrying = self._retrying
                self._end_attempt()
                self._retrying = retrying  # a retry stays a retry (and counted as one)
                self._attempt(same_ep=True)
                return
            self._attempt_failed(failure)
            return
        self.flush_response()
        if (
            self._up_framing is _CLOSE
            and failure is Failure.UPSTREAM_RESET
            and (up is None or up.clean_eof)
        ):
            # close-delimited body: the upstream's FIN is its end (a reset is a truncation)
            if self._down_framing is _CHUNKED:
                self.conn.write(LAST_CHUNK)
            self._finish(self.status, "-")
            self.conn.exchange_done(self, self.close_after or self._down_framing is _CLOSE)
            return
        # truncated response: the client must not take it for a complete one
        self._finish(self.status, failure.flag)
        self.conn.abort()

    # ------------------------------------------------------------------ flow control

    def upstream_pause_writing(self) -> None:
        """The upstream's send buffer is full: stop reading the client."""
        if not self.done:
            self._holds_down_pause += 1
            self.conn.pause_reading()

    def upstream_resume_writing(self) -> None:
        if self._holds_down_pause:
            self._holds_down_pause -= 1
            self.conn.resume_reading()

    def downstream_pause_writing(self) -> None:
        """The client's send buffer is full: stop reading the upstream."""
        up = self.up
        if up is not None and not self._holds_up_pause:
            self._holds_up_pause = True
            up.pause_reading()

    def downstream_resume_writing(self) -> None:
        up = self.up
        if up is not None and self._holds_up_pause:
            self._holds_up_pause = False
            up.resume_reading()

    # ------------------------------------------------------------------ endings

    def _local(
        self,
        reply: LocalReply,
        extra: tuple[tuple[str, str], ...] = (),
        route: Route | None = None,
    ) -> None:
        """Answer from the proxy itself (no upstream response)."""
        head = self.head
        ops_route = route
        close = reply.close or not self.request_complete_or_bodyless() or not head.keep_alive
        close = close or self.conn.draining
        if ops_route is not None and not ops_route.headers.response.empty:
            extra = tuple(apply_header_ops(list(extra), ops_route.headers.response))
        data = local_reply_bytes(
            reply.status,
            reply.body,
            content_type=reply.content_type,
            http11=head.http11,
            close=close,
            keep_alive_10=not head.http11,
            extra=extra,
            head_only=self._head_req,
        )
        self.status = reply.status
        self.response_started = True
        self.resp_bytes = len(reply.body)
        self.conn.write(data)
        self._finish(reply.status, reply.flag)
        self.conn.exchange_done(self, close)

    def request_complete_or_bodyless(self) -> bool:
        return self.request_complete or self.head.framing is _NONE

    def _finish(self, code: int, flags: str) -> None:
        if self.done:
            return
        self.done = True
        ctx = self.ctx
        if self.started:
            ctx.active_requests -= 1
        if self._in_attempt or self._retrying:
            self._end_attempt()
        if self._held is not None:
            self._drop_held()
        if self._try_timer is not None:
            self._try_timer.cancel()
            self._try_timer = None
        if self._routed_in is not None:
            self._routed_in.rq_routed -= 1
        if self._route_timer is not None:
            self._route_timer.cancel()
            self._route_timer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flags is not None:
            flags = join_flags(self._flags, flags)
        while self._holds_down_pause:
            self._holds_down_pause -= 1
            self.conn.resume_reading()
        self._buf = None
        self._replay = None
        ctx.record(self, code, flags)
        access_log = ctx.access_log
        if access_log is not None:
            access_log.record(self, code, flags)

    def idle_check(self, now: float, timeout: float) -> None:
        """Called every few seconds by the data plane's sweep (no per-request timer): a
        request whose bytes and attempts did not move for ``timeout`` ends as Envoy's
        ``stream_idle_timeout`` does -- 408 ``stream timeout`` (flag ``SI``) when nothing was
        sent yet, else the client connection is reset."""
        if self.done or not self.started:
            return
        mark = self.req_bytes + self.resp_bytes + self.attempts + (self.status << 32)
        if mark != self._progress:
            self._progress = mark
            self._progress_at = now
            return
        if now - self._progress_at < timeout:
            return
        self._drop_upstream()
        self._end_attempt()
        if self.response_started:
            self._finish(self.status, "SI")
            self.conn.abort()
            return
        self._local(local_reply(Failure.STREAM_IDLE))

    def __repr__(self) -> str:
        return (
            f"Exchange({self.head.method} {self.head.target}, status={self.status},"
            f" started={self.started}, done={self.done})"
        )
