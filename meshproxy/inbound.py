"""The sidecar's inbound listener: mTLS termination, PeerAuthentication, AuthorizationPolicy,
``x-forwarded-client-cert``, then the local application.

Theory of operation
-------------------
``meshproxy run --inbound ADDR --app HOST:PORT`` fronts one local application, as Istio's
virtual inbound listener does for a pod. Three layers, each decided once and cheaply:

1. **Accept and sniff** (:class:`InboundListener`). The listening socket is served by a reader
   callback that accepts in a batch; every new socket waits (no task, one reader callback) for
   its first byte, peeked with ``MSG_PEEK`` so nothing is consumed: ``0x16`` (a TLS handshake
   record) means TLS, anything else plaintext (Envoy's tls_inspector does the same on the
   first bytes). The workload's PeerAuthentication mode for the application's port (resolved
   once per snapshot) then decides: STRICT closes a plaintext connection without a byte of
   answer, PERMISSIVE serves both, DISABLE serves plaintext only (TLS bytes then fail HTTP
   parsing: 400). A TLS connection is handed to the event loop as a plain transport under a
   :class:`~meshproxy.net.tlsproto.TlsLayer` with the current identity's server context: the
   handshake requires a client certificate chaining to ``ca.pem`` (another CA, an expired
   certificate or none: the handshake fails and the connection is closed). A certificate
   rotation swaps the context for new connections only; established ones keep their session
   until they close.
2. **Per connection** (:class:`InboundConnection`): the verified peer's SPIFFE id, read once
   from the peer certificate's URI SAN after the handshake.
3. **Per request** (:class:`InboundExchange`): a client-supplied ``x-forwarded-client-cert``
   is removed; for an mTLS peer ``By=<own id>;URI=<peer id>`` is added; the compiled
   AuthorizationPolicy table (:mod:`meshproxy.core.authz`, compiled once per snapshot for this
   workload) is evaluated; a denial is answered ``403 RBAC: access denied`` and never reaches
   the application. A plaintext connection that outlived a switch to STRICT is closed at its
   next request. Then the ordinary :class:`~meshproxy.proxy.Exchange` forwards to the
   application through its own pool (cluster ``inbound|PORT||``: no retries, no route
   timeout, as Istio's inbound route), so streaming, deadlines, access log and drain are the
   outbound listener's code. Metrics are recorded with ``reporter="destination"`` and
   ``connection_security_policy`` ``mutual_tls`` / ``none``.

The policies come from the proxy's snapshot (``Snapshot.security``); the application's route
and cluster live in a private constant snapshot, so a config reload never touches the pool
to the application.

**Transparent capture** (``meshproxy capture``): a connection iptables redirected to this
listener carries its original destination (``SO_ORIGINAL_DST``, read once at accept); it is
forwarded to ``127.0.0.1:<original port>``, the pod's application port, instead of ``--app``,
through a per-port :class:`InboundContext` (:meth:`InboundContext.for_port`: cluster
``inbound|PORT||``, PeerAuthentication and AuthorizationPolicy evaluated for that port).
Connections that were not redirected go to ``--app`` as before. A redirected connection whose
original port is one of the proxy's own (Istio's reserved ``ISTIO_PROXY_PORTS`` and every
port this process listens on: outbound, inbound, admin, health, metrics) is closed at accept
and counted, never forwarded to ``127.0.0.1:<port>``: Istio blackholes 15006 and binds its
other listeners to localhost, so a peer can never reach the sidecar's admin API or its
outbound listener through the pod IP.

The per-port table is bounded (``Settings.max_inbound_ports``, 256): peers connecting to ever
new ports must not grow memory (each context holds its snapshot, a pool state and metric
series). A redirected connection holds a :class:`_PortLease` on its context from accept to
close (whichever way it ends: sniff timeout, refused plaintext, failed handshake, normal
close); a new port past the cap evicts the least recently used context without a lease (its
pool state and per-cluster counters are dropped), and when every context is leased the
connection is closed and counted (``refused_port_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from meshproxy.config.model import (
    Cluster,
    Endpoint,
    Meta,
    ProxyIdentity,
    Route,
    RouteTable,
    Snapshot,
    VirtualHost,
    WeightedCluster,
)
from meshproxy.config.security import MtlsMode
from meshproxy.core.authz import (
    AuthzRequest,
    AuthzTable,
    compile_policies,
    evaluate,
    request_path,
)
from meshproxy.core.peerauthn import WorkloadMtls, resolve_workload
from meshproxy.errors import Failure, local_reply
from meshproxy.http.codec import TargetError, parse_target
from meshproxy.http.server import HttpConnection, RequestHead, ServerContext
from meshproxy.net.listen import BACKLOG, strip_brackets
from meshproxy.net.origdst import original_dst
from meshproxy.net.tlsproto import TlsLayer
from meshproxy.proxy import Exchange, ProxyContext
from meshproxy.settings import Settings
from meshproxy.state import State
from meshproxy.upstream.pool import Pools

if TYPE_CHECKING:
    from meshproxy.accesslog import AccessLog
    from meshproxy.metrics import Metrics
    from meshproxy.tls import IdentityStore

log = logging.getLogger(__name__)

XFCC = b"x-forwarded-client-cert"
TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a handshake (ClientHello)
ACCEPT_BATCH = 64  # connections accepted per readiness callback of the listening socket
_DENIED = local_reply(Failure.RBAC_DENIED)
_BAD_REQUEST = local_reply(Failure.BAD_REQUEST)
_XFCC_LEN = len(XFCC)
_INBOUND_META = Meta(kind="Inbound", name="app", namespace="")
POD_LOCALHOST = "127.0.0.1"  # where a redirected connection's original port is served
# Istio's reserved sidecar ports (admin, outbound, tunnel, inbound, HBONE, agent, health, DNS,
# Prometheus): a connection redirected to one is closed, never served from the pod IP
ISTIO_PROXY_PORTS = frozenset(
    {15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090}
)


def app_cluster_name(port: int) -> str:
    """Istio's name for the inbound cluster of a workload port."""
    return f"inbound|{port}||"


def app_snapshot(host: str, port: int) -> Snapshot:
    """The constant routing of the inbound side: every request to the application."""
    name = app_cluster_name(port)
    cluster = Cluster(
        name=name,
        host=host,
        port=port,
        endpoints=(Endpoint(address=strip_brackets(host), port=port),),
        service_name="inbound",
        meta=_INBOUND_META,
    )
    route = Route(
        name="default",
        meta=_INBOUND_META,
        clusters=(WeightedCluster(cluster=name, weight=100, host=host),),
        total_weight=100,
        retries=None,  # Istio's inbound route: no retries, no timeout
        timeout=None,
    )
    vh = VirtualHost(
        name=f"inbound|http|{port}", meta=_INBOUND_META, domains=("*",), routes=(route,)
    )
    return Snapshot(version="inbound", routes=RouteTable(catch_all=vh), clusters={name: cluster})


def peer_spiffe_id(ssl_object: Any) -> str | None:
    """The verified peer certificate's ``spiffe://`` URI SAN (None without one)."""
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):
        return None
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith("spiffe://"):
            return str(value)
    return None


@dataclass(frozen=True, slots=True)
class InboundPolicy:
    """What the inbound side enforces under one snapshot, for this workload."""

    mtls: WorkloadMtls
    mode: MtlsMode  # for the application's port
    authz: AuthzTable

    def describe(self) -> dict[str, Any]:
        return {
            "mtls_mode": self.mode.value,
            "peer_authentication": list(self.mtls.policies),
            "authorization_policies": list(self.authz.policies),
        }


def inbound_policy(snap: Snapshot, workload: ProxyIdentity, port: int) -> InboundPolicy:
    sec = snap.security
    mtls = resolve_workload(sec.peer_authn, workload.namespace, workload.labels)
    table = compile_policies(sec.authz, workload.namespace, workload.labels, sec.root_namespace)
    return InboundPolicy(mtls=mtls, mode=mtls.mode_for(port), authz=table)


class InboundContext(ProxyContext):
    """The :class:`ProxyContext` of the inbound listener: the application's constant snapshot
    plus the workload's policies, recompiled when the proxy's snapshot changes."""

    __slots__ = (
        "_policy",
        "_policy_snap",
        "_ports",
        "app_host",
        "app_port",
        "identity",
        "mesh_state",
        "users",
        "workload",
    )

    def __init__(
        self,
        mesh_state: State,
        workload: ProxyIdentity,
        app: tuple[str, int],
        identity: IdentityStore | None,
        pools: Pools,
        metrics: Metrics,
        settings: Settings,
        access_log: AccessLog | None = None,
    ) -> None:
        state = State()
        state.apply(app_snapshot(app[0], app[1]))
        super().__init__(state, pools, metrics, settings, access_log)
        self.mesh_state = mesh_state
        self.workload = workload
        self.app_host = app[0]
        self.app_port = app[1]
        self._ports: dict[int, InboundContext] = {}  # least recently acquired first
        self.users = 0  # connections holding a lease on this (per-port) context
        self.identity = identity
        self._policy_snap: Snapshot | None = None
        self._policy: InboundPolicy | None = None

    def policy(self) -> InboundPolicy:
        """The policy under the current snapshot (compiled on the first request after a
        swap; a bad policy can never stop requests: compile problems are the translation's)."""
        snap = self.mesh_state.snapshot
        pol = self._policy
        if pol is None or snap is not self._policy_snap:
            pol = self._policy = inbound_policy(snap, self.workload, self.app_port)
            self._policy_snap = snap
        return pol

    def own_id(self) -> str | None:
        store = self.identity
        ident = store.current if store is not None else None
        return ident.spiffe_id if ident is not None else None

    def for_port(self, port: int) -> InboundContext | None:
        """The context serving connections redirected to this pod's ``port``: the application
        at ``127.0.0.1:port`` (this context itself when that is ``--app``), made on first use
        and kept while the table has room; it shares pools, metrics, identity and access log.
        A per-port context returned here is leased (``users`` + 1): the caller releases it
        with :meth:`release` when the connection ends. None: the table is full of contexts
        in use (the connection must be refused)."""
        if port == self.app_port and self.app_host == POD_LOCALHOST:
            return self
        table = self._ports
        got = table.pop(port, None)
        if got is None:
            if len(table) >= self.settings.max_inbound_ports and not self._evict_idle():
                return None
            got = InboundContext(
                self.mesh_state,
                self.workload,
                (POD_LOCALHOST, port),
                self.identity,
                self.pools,
                self.metrics,
                self.settings,
                self.access_log,
            )
        table[port] = got  # now the most recently used
        got.users += 1
        return got

    def release(self, ctx: InboundContext) -> None:
        """A connection leasing ``ctx`` (from :meth:`for_port`) ended."""
        ctx.users -= 1

    def _evict_idle(self) -> bool:
        """Forget the least recently used context no connection holds, with its pool state
        and per-cluster counters; False if every one is in use."""
        for port, ctx in self._ports.items():
            if ctx.users == 0:
                del self._ports[port]
                name = app_cluster_name(port)
                self.pools.drop(name)
                forget = getattr(self.metrics, "forget_cluster", None)
                if forget is not None:
                    forget(name)
                return True
        return False

    @property
    def make_exchange(self) -> Callable[[HttpConnection, RequestHead], Exchange]:
        return partial(InboundExchange, self)

    def record(self, ex: Exchange, code: int, flags: str) -> None:
        conn: InboundConnection = ex.conn  # type: ignore[assignment]  # this listener's
        self.metrics.record_inbound(
            conn.peer_id,
            conn.mtls,
            code,
            flags,
            time.monotonic() - ex.head.t0,
            ex.req_bytes,
            ex.resp_bytes,
        )


class _PortLease:
    """A redirected connection's hold on its per-port context, released exactly once however
    the connection ends (so a context in use is never evicted)."""

    __slots__ = ("ctx", "root")

    def __init__(self, root: InboundContext, ctx: InboundContext) -> None:
        self.root: InboundContext | None = root
        self.ctx = ctx

    def release(self) -> None:
        root = self.root
        if root is not None:
            self.root = None
            root.release(self.ctx)


class InboundConnection(HttpConnection):
    """A downstream connection of the inbound listener: knows its peer's verified identity."""

    __slots__ = ("lease", "mtls", "peer_id", "port_ctx")

    def __init__(self, ctx: ServerContext, lease: _PortLease | None = None) -> None:
        super().__init__(ctx)
        self.mtls = False
        self.peer_id: str | None = None
        # redirected by iptables to a port other than --app's: that port's context, leased
        self.lease = lease
        self.port_ctx = None if lease is None else lease.ctx

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            if sslobj.session_reused and _expired(sslobj):
                # a resumed session skips certificate verification: a peer whose certificate
                # expired since the full handshake must make a new one (and fail it)
                transport.abort()
                return
            self.mtls = True
            self.scheme = "https"
            self.scheme_b = b"https"
            self.peer_id = peer_spiffe_id(sslobj)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lease is not None:
            self.lease.release()
        super().connection_lost(exc)


def _expired(ssl_object: Any) -> bool:
    try:
        cert = ssl_object.getpeercert()
        return bool(cert) and ssl.cert_time_to_seconds(cert["notAfter"]) < time.time()
    except (ValueError, KeyError, ssl.SSLError):
        return True


def _normalised_target(target: str) -> str:
    """The origin-form target with Envoy's path normalisation as Istio configures it (dot
    segments removed, percent-encoded unreserved characters decoded; the query kept): the
    path authorization evaluates is exactly the one the application receives."""
    i = target.find("#")
    if i >= 0:
        target = target[:i]
    i = target.find("?")
    path, query = (target, "") if i < 0 else (target[:i], target[i:])
    return request_path(path) + query


def _is_xfcc(name: bytes) -> bool:
    """``x-forwarded-client-cert`` also spelled with underscores (which CGI/WSGI apps fold
    into the same variable)."""
    return len(name) == _XFCC_LEN and (name == XFCC or name.replace(b"_", b"-") == XFCC)


class InboundExchange(Exchange):
    """An inbound request: identity headers and authorization, then the ordinary exchange."""

    __slots__ = ()

    def _start(self) -> None:
        conn = self.conn
        assert isinstance(conn, InboundConnection)
        ctx = conn.port_ctx
        if ctx is None:
            ctx = self.ctx
        else:  # redirected to another port of the pod: that port's application and policies
            self.ctx = ctx
        assert isinstance(ctx, InboundContext)
        pol = ctx.policy()
        if pol.mode is MtlsMode.STRICT and not conn.mtls:
            # the mode became STRICT after this plaintext connection was accepted
            self.started = True
            ctx.active_requests += 1
            self._finish(0, "-")
            conn.abort()
            return
        head = self.head
        target = head.target_b
        if target[:1] != b"/":  # absolute-form: authorize what will be forwarded
            try:
                _, url_authority, path = parse_target(head.target)
            except TargetError:
                self.started = True
                ctx.active_requests += 1
                self._local(_BAD_REQUEST)
                return
            target = head.target_b = path.encode("latin-1")
            if url_authority:
                head.host = url_authority
        if b"%" in target or b"/." in target:
            head.target_b = _normalised_target(head.target).encode("latin-1")
        headers = head.headers
        for name, _ in headers:
            if len(name) == _XFCC_LEN and _is_xfcc(name):
                # never trust a client's: only this proxy vouches for a peer
                head.headers = headers = [h for h in headers if not _is_xfcc(h[0])]
                head._map = None
                break
        drop = head.drop
        if drop is not None and XFCC in drop:  # "Connection: x-forwarded-client-cert"
            head.drop = [d for d in drop if d != XFCC] or None
        peer = conn.peer_id
        if peer is not None:
            own = ctx.own_id()
            if own is not None:
                headers.append((XFCC, f"By={own};URI={peer}".encode("latin-1")))
        if not pol.authz.empty:
            decision = evaluate(
                pol.authz,
                AuthzRequest(
                    principal=peer,
                    source_ip=conn.peer_ip,
                    destination_port=ctx.app_port,
                    method=head.method,
                    path=head.target,
                    host=head.host,
                    headers=_headers_for_authz(head),
                ),
            )
            if not decision.allowed:
                log.debug(
                    "RBAC: denied %s %s from %s (%s)",
                    head.method,
                    head.target,
                    peer or conn.peer_ip,
                    decision.policy or "no ALLOW policy matched",
                )
                self.started = True
                ctx.active_requests += 1
                self._local(_DENIED)
                return
        super()._start()


def _headers_for_authz(head: RequestHead) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for name, value in head.headers:
        k = name.decode("latin-1")
        v = value.decode("latin-1")
        out[k] = v if k not in out else out[k] + "," + v
    return out


def _handshake_timeout(layer: TlsLayer) -> None:
    if not layer.handshake.done():
        layer.handshake.set_exception(TimeoutError("TLS handshake timed out"))
    layer.abort()


class InboundListener:
    """Accepts, sniffs TLS from plaintext by the first byte, and hands each connection to the
    event loop with or without the current identity's server TLS context."""

    def __init__(
        self,
        ctx: InboundContext,
        server_ctx: ServerContext,
        settings: Settings,
        own_ports: set[int] | None = None,
    ) -> None:
        self._ctx = ctx
        self._server_ctx = server_ctx
        self._settings = settings
        # ports a redirected connection is never forwarded to (shared with the owner, which
        # adds the ports it binds)
        self.own_ports: set[int] = set() if own_ports is None else own_ports
        self.own_ports.update(ISTIO_PROXY_PORTS)
        self.refused_proxy_port = 0
        self.refused_port_limit = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[
            int, tuple[socket.socket, asyncio.TimerHandle, InboundContext, _PortLease | None]
        ] = {}
        self._handshakes: set[asyncio.Task[Any]] = set()
        self.refused_plaintext = 0
        self.handshake_failures = 0
        self._warned_no_identity = False

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        loop = self._loop = asyncio.get_running_loop()
        host = strip_brackets(host)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        loop.add_reader(sock.fileno(), self._on_accept)
        name = sock.getsockname()
        self.own_ports.add(int(name[1]))
        return str(name[0]), int(name[1])

    @property
    def address(self) -> tuple[str, int] | None:
        if self._sock is None:
            return None
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    def _on_accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: the backlog keeps the rest
                log.warning("inbound: accept failed: %s", e)
                return
            conn.setblocking(False)
            orig = original_dst(conn)  # redirected by meshproxy capture: that port's context
            if orig is None:
                self._sniff(conn, self._ctx, None)
            elif orig[1] in self.own_ports:
                self._refuse_proxy_port(conn, orig[1])
            else:
                root = self._ctx
                pctx = root.for_port(orig[1])
                if pctx is None:
                    self._refuse_port_limit(conn)
                elif pctx is root:
                    self._sniff(conn, root, None)
                else:
                    self._sniff(conn, pctx, _PortLease(root, pctx))

    def _refuse_port_limit(self, conn: socket.socket) -> None:
        """Every per-port context is in use: the connection to yet another port is closed."""
        conn.close()
        self.refused_port_limit += 1
        n = self.refused_port_limit
        if n == 1 or n % 1000 == 0:
            log.warning(
                "inbound: connection to a new port closed: %d ports in use (max_inbound_ports)"
                " (%d so far)",
                len(self._ctx._ports),
                n,
            )

    def _refuse_proxy_port(self, conn: socket.socket, port: int) -> None:
        """A peer tried the sidecar's own port through the pod IP: closed, counted; logged at
        the first and every 1000th (a scanner must not flood the log)."""
        conn.close()
        self.refused_proxy_port += 1
        n = self.refused_proxy_port
        if n == 1 or n % 1000 == 0:
            log.warning(
                "inbound: connection redirected to the proxy's own port %d closed (%d so far)",
                port,
                n,
            )

    def _sniff(self, conn: socket.socket, pctx: InboundContext, lease: _PortLease | None) -> None:
        loop = self._loop
        assert loop is not None
        if pctx.policy().mode is MtlsMode.DISABLE:
            self._serve(conn, None, pctx, lease)
            return
        fd = conn.fileno()
        timer = loop.call_later(self._settings.first_byte_timeout, self._sniff_timeout, fd)
        self._pending[fd] = (conn, timer, pctx, lease)
        loop.add_reader(fd, self._first_byte, fd)

    @staticmethod
    def _drop(conn: socket.socket, lease: _PortLease | None) -> None:
        """Close a connection that is not served (its lease ends with it)."""
        conn.close()
        if lease is not None:
            lease.release()

    def _sniff_timeout(self, fd: int) -> None:
        entry = self._pending.pop(fd, None)
        if entry is not None:
            assert self._loop is not None
            self._loop.remove_reader(fd)
            self._drop(entry[0], entry[3])

    def _first_byte(self, fd: int) -> None:
        entry = self._pending.pop(fd, None)
        loop = self._loop
        assert loop is not None
        loop.remove_reader(fd)
        if entry is None:
            return
        conn, timer, pctx, lease = entry
        timer.cancel()
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):  # spurious wake-up: wait again, same deadline
            timer = loop.call_at(timer.when(), self._sniff_timeout, fd)
            self._pending[fd] = (conn, timer, pctx, lease)
            loop.add_reader(fd, self._first_byte, fd)
            return
        except OSError:
            self._drop(conn, lease)
            return
        if not first:
            self._drop(conn, lease)
            return
        mode = pctx.policy().mode
        if first[0] == TLS_HANDSHAKE and mode is not MtlsMode.DISABLE:
            store = self._ctx.identity
            ident = store.current if store is not None else None
            if ident is None:
                if not self._warned_no_identity:
                    self._warned_no_identity = True
                    log.warning(
                        "inbound: a TLS connection arrived but this proxy has no workload "
                        "certificate (--cert-dir): closed"
                    )
                self._drop(conn, lease)
                return
            self._serve(conn, ident.server_context, pctx, lease)
            return
        if mode is MtlsMode.STRICT:
            self.refused_plaintext += 1
            if self.refused_plaintext == 1 or self.refused_plaintext % 1000 == 0:
                log.info(
                    "inbound: plaintext connection refused under PeerAuthentication STRICT "
                    "(%d so far)",
                    self.refused_plaintext,
                )
            self._drop(conn, lease)
            return
        self._serve(conn, None, pctx, lease)

    def _serve(
        self,
        conn: socket.socket,
        ctx: ssl.SSLContext | None,
        pctx: InboundContext,
        lease: _PortLease | None,
    ) -> None:
        loop = self._loop
        assert loop is not None
        inner = InboundConnection(self._server_ctx, lease)
        layer: TlsLayer | None = None
        timer: asyncio.TimerHandle | None = None
        if ctx is None:
            proto: asyncio.Protocol = inner
        else:
            layer = TlsLayer(ctx, inner, server_side=True, loop=loop)
            timer = loop.call_later(self._settings.tls_handshake_timeout, _handshake_timeout, layer)
            layer.handshake.add_done_callback(partial(self._handshake_done, timer, lease))
            proto = layer
        task = loop.create_task(loop.connect_accepted_socket(lambda: proto, conn))
        self._handshakes.add(task)
        task.add_done_callback(partial(self._served, conn, layer, timer, lease))

    def _handshake_done(
        self, timer: asyncio.TimerHandle, lease: _PortLease | None, fut: asyncio.Future[None]
    ) -> None:
        timer.cancel()
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None or fut.cancelled():
            if lease is not None:  # the inner connection never started: nothing else releases
                lease.release()
        if exc is not None:
            self.handshake_failures += 1
            n = self.handshake_failures
            # a scanner must not flood the log: the first, then every 1000th at info level
            log.log(
                logging.INFO if n == 1 or n % 1000 == 0 else logging.DEBUG,
                "inbound: TLS handshake failed (%d so far): %s",
                n,
                exc or type(exc).__name__,
            )

    def _served(
        self,
        conn: socket.socket,
        layer: TlsLayer | None,
        timer: asyncio.TimerHandle | None,
        lease: _PortLease | None,
        task: asyncio.Task[Any],
    ) -> None:
        self._handshakes.discard(task)
        if task.cancelled() or task.exception() is not None:
            self._drop(conn, lease)
            if timer is not None:
                timer.cancel()
            if layer is not None and not layer.handshake.done():
                layer.handshake.set_exception(ConnectionAbortedError("not served"))

    def close(self) -> None:
        """Stop accepting; connections still sniffing are closed, established ones stay."""
        loop = self._loop
        sock = self._sock
        self._sock = None
        if loop is not None:
            if sock is not None:
                loop.remove_reader(sock.fileno())
            for fd, (conn, timer, _, lease) in list(self._pending.items()):
                timer.cancel()
                loop.remove_reader(fd)
                self._drop(conn, lease)
        self._pending.clear()
        if sock is not None:
            sock.close()

    async def wait_closed(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def __repr__(self) -> str:
        return f"InboundListener(address={self.address}, sniffing={len(self._pending)})"
