"""Live upstream state per cluster: endpoint picker, active request counts, keep-alive pools.

Theory of operation
-------------------
The snapshot says *what* the clusters are; :class:`Pools` holds what happens to them at run
time. For each cluster name there is one :class:`ClusterState` with the picker built once
(``make_picker(cluster)``) and one :class:`EndpointState` per endpoint, holding the endpoint's
active request count (what least-request balancing reads) and its idle keep-alive connections
(a LIFO stack, so the oldest ones age out under ``idle timeout = min(settings, cluster)``).

Decide, then do I/O: :meth:`ClusterState.pick` and :meth:`Pools.take_idle` are plain
bookkeeping; only :meth:`Pools.connect` awaits (with the cluster's ``connect_timeout``) and it
raises :class:`ConnectFailure` for every way a connect can fail.

On a snapshot swap (:meth:`Pools.on_snapshot`, subscribed to ``State``) a cluster whose
definition changed gets a new picker, while endpoint states (and their pooled connections) of
endpoints that still exist are carried over; endpoints and clusters that are gone have their
idle connections closed, and their busy ones are closed when released.

Circuit breaking (Envoy's cluster resource manager, per cluster name, carried across
redefinitions in :class:`ClusterCounters`): ``rq_active`` (attempts in flight, limited by
``max_requests``), ``rq_pending`` (attempts waiting for a connection, limited by
``max_pending_requests``), ``retries_active`` (limited by the retry budget / ``max_retries``) and
``cx_active`` (open connections and connects in progress, limited by ``max_connections``;
a connect is counted when it is decided, :meth:`Pools.reserve`). As in Envoy's HTTP/1 pool, an
endpoint without any connection may always open one (no deadlock under a small limit); over the
limit an attempt waits in the endpoint's ``waiters`` queue (a callable per waiter) until a
connection of that endpoint is released (handed over directly) or closes (the waiter may then
connect). The waits themselves have deadlines, kept by their owner (the exchange).

Outlier detection: a cluster with ``outlier`` gets an
:class:`~meshproxy.core.outlier.OutlierDetector` over the endpoints' :class:`HostHealth` (which
live on the endpoint states, so counters and ejections survive a redefinition); its
``available`` mask is what the picker reads, and :meth:`Pools.sweep` runs every ``interval``.

A connection goes back to the idle stack only when its last response was complete and
keep-alive, the request was fully sent, ``max_requests_per_connection`` is not reached, the
endpoint still exists and the stack is below ``Settings.max_idle_per_endpoint``.

Outbound TLS: each ``ClusterState`` carries a :class:`ClientTls` (None = plaintext), computed
once per cluster definition and workload-identity generation (:meth:`Pools._apply_tls`, also
run for every cluster when :attr:`Pools.identity` swaps): the context (the identity's for
ISTIO_MUTUAL and auto-mTLS, one built from the DestinationRule's files for SIMPLE / MUTUAL,
cached by paths and (mtime, size, inode) in :class:`FileContexts` and built off the loop), the
SNI, and the peer names to accept per endpoint. :meth:`Pools.connect` connects TCP with a
:class:`~meshproxy.net.tlsproto.TlsLayer` as the transport's protocol, which runs the handshake
and then carries the connection (a TCP failure is UF and everything after it a TLS failure,
``ConnectFailure(tls=True)``), all under the connect timeout, then checks the peer's SANs
(any of them may match a configured name, as in Envoy) or SPIFFE id. Pools are keyed by what
a connection was verified with, a :class:`TlsKey` (context, SNI, accepted names, the
endpoint's expected SPIFFE id; compared by identity): every connection remembers its key
(``tls_key``) and every endpoint the one new connections get, replaced whenever any part
changes (a rotation, new files, a DestinationRule's ``sni`` / ``subjectAltNames``, a
WorkloadEntry's ``serviceAccount``). A TLS cluster always has a key, even before its SIMPLE /
MUTUAL context is built or without the identity ISTIO_MUTUAL needs, so plaintext connections
(key None) are never handed to it. Idle connections of an older key are closed when the key
changes and busy ones are closed instead of pooled when released (their in-flight request
finishes on the old, still valid, session). The handshake uses the context the connect
obtained, whatever happens to ``ClusterState.tls`` meanwhile. TLS sessions are
resumed per endpoint: the session saved after a connection's first response (when TLS 1.3's
ticket has arrived) is offered by the next handshake to that endpoint (``session=``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from meshproxy.config.model import Cluster, ConnectionPool, Endpoint, Snapshot, TlsMode, TlsPolicy
from meshproxy.core.balance import Picker, make_picker
from meshproxy.core.outlier import HostHealth, OutlierDetector
from meshproxy.net.tlsproto import TlsLayer
from meshproxy.settings import Settings
from meshproxy.tls import (
    IdentityStore,
    WorkloadIdentity,
    make_client_context,
    peer_spiffe_id,
    san_matches,
)
from meshproxy.upstream.connection import UpstreamConnection

if TYPE_CHECKING:
    from meshproxy.metrics import Metrics

log = logging.getLogger(__name__)
_UNLIMITED = ConnectionPool().max_connections
Waiter = Callable[["UpstreamConnection | None"], None]
"""A pending attempt: called with a released connection, or None when it may connect."""


class ConnectFailure(Exception):
    """The connect to an endpoint failed: TCP (refused, unreachable, timed out), or, with
    ``tls`` set, the TLS handshake or the peer identity check (Envoy: a connect failure too)."""

    def __init__(self, message: str, *, tls: bool = False) -> None:
        super().__init__(message)
        self.tls = tls


FileSpec = tuple[str | None, str | None, str | None, bool]
"""A SIMPLE / MUTUAL context's inputs: (caCertificates, clientCertificate, privateKey, verify)."""
Stamps = tuple[tuple[int, int, int] | None, ...]
"""(mtime_ns, size, inode) of each file, None if absent: two writes within one mtime tick still
differ in size (or inode, for a rename), so a half-written bundle is not kept."""


class ClientTls:
    """How one cluster state's connections do TLS (built by :meth:`Pools._apply_tls`).

    ``ctx`` is the context new connections use (for ``files`` it is filled in by the first
    connect and replaced when the files change); ``sans`` the configured peer names (URI, DNS
    or IP); ``peer_ids`` the SPIFFE ids accepted per endpoint key for ISTIO_MUTUAL when no
    ``sans`` are configured (from the endpoint's ``serviceAccount``); ``error`` a reason every
    connect fails (ISTIO_MUTUAL without a workload identity). ``info`` is what ``/clusters``
    shows (kept current: the last verified peer, handshake and resumption counts)."""

    __slots__ = (
        "ctx",
        "error",
        "files",
        "generation",
        "info",
        "mode",
        "peer_ids",
        "sans",
        "sni",
        "spiffe",
    )

    def __init__(
        self,
        mode: TlsMode,
        *,
        auto: bool = False,
        ctx: ssl.SSLContext | None = None,
        sni: str | None = None,
        sans: tuple[str, ...] = (),
        peer_ids: dict[str, str] | None = None,
        files: FileSpec | None = None,
        error: str | None = None,
        generation: int = 0,
    ) -> None:
        self.mode = mode
        self.ctx = ctx
        self.sni = sni
        self.sans = sans
        self.peer_ids = peer_ids or {}
        self.files = files
        self.error = error
        self.generation = generation
        self.spiffe = mode is TlsMode.ISTIO_MUTUAL  # peer must present a SPIFFE id
        self.info: dict[str, Any] = {
            "mode": mode.value,
            "auto": auto,
            "sni": sni,
            "subject_alt_names": list(sans),
            "peer": None,
            "handshakes": 0,
            "resumed": 0,
        }
        if error is not None:
            self.info["error"] = error

    def check_peer(self, ep: EndpointState, obj: ssl.SSLObject | None) -> str:
        """The verified peer name after a handshake; raises :class:`ConnectFailure` when the
        peer is not one this cluster accepts."""
        if obj is None:
            raise ConnectFailure(f"{ep.key}: no TLS session", tls=True)
        if self.spiffe:
            peer = peer_spiffe_id(obj)
            if self.sans:
                # as Envoy's SAN matchers: any of the certificate's names may match
                got = san_matches(obj.getpeercert(), self.sans)
                if got is None:
                    raise ConnectFailure(
                        f"{ep.key}: peer {peer or 'without a SPIFFE id'} is not one of"
                        f" {', '.join(self.sans)}",
                        tls=True,
                    )
                return got
            if peer is None:
                raise ConnectFailure(f"{ep.key}: peer certificate has no SPIFFE id", tls=True)
            wanted = self.peer_ids.get(ep.key)
            if wanted is not None:
                if san_matches(obj.getpeercert(), (wanted,)) is None:
                    raise ConnectFailure(
                        f"{ep.key}: peer {peer} is not the endpoint's service account ({wanted})",
                        tls=True,
                    )
                return wanted
            return peer
        if self.sans:
            got = san_matches(obj.getpeercert(), self.sans)
            if got is None:
                raise ConnectFailure(
                    f"{ep.key}: server certificate matches none of {', '.join(self.sans)}",
                    tls=True,
                )
            return got
        cert = obj.getpeercert()
        if cert:  # verified: name it by its first SAN
            for _kind, value in cert.get("subjectAltName", ()):
                return str(value)
        return "-"

    def expected_peer(self, ep_key: str) -> str | None:
        """The SPIFFE id endpoint ``ep_key`` must present (ISTIO_MUTUAL by service account)."""
        if self.spiffe and not self.sans:
            return self.peer_ids.get(ep_key)
        return None

    def key_for(self, ep_key: str, current: TlsKey | None) -> TlsKey:
        """The pool key of endpoint ``ep_key``'s new connections: ``current`` when it stands
        for the same verification, else a new one (which retires the old one's connections)."""
        peer = self.expected_peer(ep_key)
        if current is not None and current.matches(self, self.ctx, peer):
            return current
        return TlsKey(self, self.ctx, peer)

    def __repr__(self) -> str:
        return f"ClientTls({self.mode.value}, sni={self.sni!r}, sans={self.sans!r})"


class TlsKey:
    """What a TLS connection was made and verified with: the context (our certificate, the
    trust bundle), the SNI, the accepted names (``subjectAltNames``, or the endpoint's
    expected SPIFFE id) and the mode / files. Compared by identity: an endpoint holds the key
    its new connections get, replaced whenever any of these changes, and a pooled connection
    is handed out only while its key is still the endpoint's. A TLS cluster always has one,
    even before its context exists (never None, the plaintext connections' key)."""

    __slots__ = ("ctx", "files", "mode", "peer", "sans", "sni")

    def __init__(self, tls: ClientTls, ctx: ssl.SSLContext | None, peer: str | None) -> None:
        self.mode = tls.mode
        self.ctx = ctx
        self.sni = tls.sni
        self.sans = tls.sans
        self.files = tls.files
        self.peer = peer

    def matches(self, tls: ClientTls, ctx: ssl.SSLContext | None, peer: str | None) -> bool:
        return (
            self.ctx is ctx
            and self.mode is tls.mode
            and self.sni == tls.sni
            and self.sans == tls.sans
            and self.files == tls.files
            and self.peer == peer
        )

    def __repr__(self) -> str:
        ctx = "none" if self.ctx is None else hex(id(self.ctx))
        return f"TlsKey({self.mode.value}, ctx={ctx}, sni={self.sni!r}, peer={self.peer!r})"


def istio_sni(cluster: Cluster) -> str:
    """Istio's SNI for ISTIO_MUTUAL: ``outbound_.<port>_.<subset>_.<host>``."""
    return f"outbound_.{cluster.port}_.{cluster.subset or ''}_.{cluster.host}"


def _ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


def _build_file_context(spec: FileSpec) -> tuple[Stamps, ssl.SSLContext]:
    """Blocking (run in a thread): read the files and build a client context."""
    ca, cert, key, verify = spec
    stamps = _stamps(spec)

    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConnectFailure(
                f"{what} {path}: {e.strerror or type(e).__name__}", tls=True
            ) from None

    ca_pem = read(ca, "caCertificates") if ca and verify else None
    cert_pem = read(cert, "clientCertificate") if cert else None
    key_pem = read(key, "privateKey") if key else None
    if (cert_pem is None) != (key_pem is None):
        raise ConnectFailure("clientCertificate and privateKey must be given together", tls=True)
    try:
        ctx = make_client_context(
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_pem=ca_pem,
            verify=verify,
            system_roots=ca_pem is None,
        )
    except (ssl.SSLError, ValueError) as e:
        raise ConnectFailure(f"TLS files {spec[:3]}: {e}", tls=True) from None
    return stamps, ctx


def tls_file_spec(pol: TlsPolicy) -> FileSpec:
    """The files (and whether to verify) of a SIMPLE / MUTUAL policy."""
    mutual = pol.mode is TlsMode.MUTUAL
    return (
        pol.ca_certificates,
        pol.client_certificate if mutual else None,
        pol.private_key if mutual else None,
        not pol.insecure_skip_verify,
    )


def check_tls_files(clusters: Iterable[Cluster]) -> list[str]:
    """Blocking (run in a thread): one line per SIMPLE / MUTUAL cluster whose files cannot be
    read or do not make a TLS context -- what Envoy NACKs a cluster for."""
    problems: list[str] = []
    seen: dict[FileSpec, str | None] = {}
    for c in clusters:
        pol = c.tls
        if pol is None or pol.mode not in (TlsMode.SIMPLE, TlsMode.MUTUAL):
            continue
        spec = tls_file_spec(pol)
        if spec not in seen:
            try:
                _build_file_context(spec)
                seen[spec] = None
            except ConnectFailure as e:
                seen[spec] = str(e)
        if seen[spec] is not None:
            problems.append(f"cluster {c.name}: tls: {seen[spec]}")
    return problems


def _stamps(spec: FileSpec) -> Stamps:
    out: list[tuple[int, int, int] | None] = []
    for path in spec[:3]:
        if not path:
            out.append(None)
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class FileContexts:
    """SIMPLE / MUTUAL client contexts by their files, rebuilt when a file's (mtime, size,
    inode) changes (checked at most every ``recheck`` seconds per spec); reads happen off the
    loop."""

    def __init__(self, recheck: float = 1.0) -> None:
        self.recheck = recheck
        self._cache: dict[FileSpec, tuple[Stamps, ssl.SSLContext]] = {}
        self._checked: dict[FileSpec, float] = {}

    def cached(self, spec: FileSpec) -> ssl.SSLContext | None:
        got = self._cache.get(spec)
        return got[1] if got is not None else None

    async def get(self, spec: FileSpec) -> ssl.SSLContext:
        """The context for ``spec`` (raises :class:`ConnectFailure` with ``tls`` set)."""
        now = time.monotonic()
        got = self._cache.get(spec)
        if got is not None and now - self._checked.get(spec, 0.0) < self.recheck:
            return got[1]
        self._checked[spec] = now
        if got is not None:
            stamps = await asyncio.to_thread(_stamps, spec)
            if stamps == got[0]:
                return got[1]
        built = await asyncio.to_thread(_build_file_context, spec)
        self._cache[spec] = built
        return built[1]


class ClusterCounters:
    """Envoy's per-cluster resource counts (circuit breakers), shared by every generation of a
    cluster's state."""

    __slots__ = (
        "cx_active",
        "retries_active",
        "retries_peak",
        "rq_active",
        "rq_pending",
        "rq_routed",
    )

    def __init__(self) -> None:
        # requests routed to the cluster and not finished (in an attempt, waiting for a
        # connection or in a retry's backoff): what the retry budget's percentage is of
        self.rq_routed = 0
        self.rq_active = 0  # attempts in flight (max_requests)
        self.rq_pending = 0  # attempts waiting for a connection (max_pending_requests)
        self.retries_active = 0  # retries in flight (budget / max_retries)
        self.retries_peak = 0  # the most retries ever in flight at once
        self.cx_active = 0  # open upstream connections (max_connections)

    def view(self) -> dict[str, int]:
        """For ``/clusters``: the live counts (and the retries' high-water mark)."""
        return {
            "rq_active": self.rq_active,
            "rq_pending": self.rq_pending,
            "rq_routed": self.rq_routed,
            "retries_active": self.retries_active,
            "retries_peak": self.retries_peak,
            "cx_active": self.cx_active,
        }

    def __repr__(self) -> str:
        return (
            f"ClusterCounters(rq={self.rq_active}, pending={self.rq_pending},"
            f" retries={self.retries_active}, cx={self.cx_active})"
        )


class EndpointState:
    """Run-time state of one endpoint (shared by every ``ClusterState`` generation)."""

    __slots__ = (
        "active",
        "address",
        "conns",
        "counters",
        "endpoint",
        "health",
        "idle",
        "index",
        "key",
        "opened",
        "port",
        "removed",
        "tls_key",
        "tls_session",
        "waiters",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.address = endpoint.address
        self.port = endpoint.port
        self.key = endpoint.key
        self.active = 0  # requests in flight to this endpoint
        self.idle: list[UpstreamConnection] = []  # keep-alive connections, most recent last
        self.opened = 0  # connections opened over the endpoint's life
        self.removed = False  # no longer in the cluster: do not pool its connections
        self.conns = 0  # open connections (busy and idle)
        self.index = 0  # position in the current ClusterState's endpoints
        self.counters: ClusterCounters | None = None
        self.health = HostHealth()
        self.waiters: deque[Waiter] = deque()
        # the TLS key new connections get (None: plaintext only): pooled connections made
        # with another one are never handed out (TlsKey)
        self.tls_key: TlsKey | None = None
        # (key, session) of the last handshake, offered by the next one made under the same
        # key (resumption)
        self.tls_session: tuple[TlsKey, ssl.SSLSession] | None = None

    def set_tls_key(self, key: TlsKey | None) -> None:
        """New connections get ``key``: idle ones made with another are closed (busy ones
        are closed instead of pooled when released)."""
        if key is self.tls_key:
            return
        self.tls_key = key
        if self.idle:
            keep = [c for c in self.idle if c.tls_key is key]
            stale = [c for c in self.idle if c.tls_key is not key]
            self.idle = keep
            for conn in stale:
                conn.close()

    @property
    def ejected(self) -> bool:
        return self.health.ejected

    def connection_closed(self) -> None:
        """Called by a connection of this endpoint when it closes (counted once)."""
        self.conns -= 1
        c = self.counters
        if c is not None:
            c.cx_active -= 1
        if self.waiters:
            w = self.waiters.popleft()
            if c is not None:
                c.rq_pending -= 1
            w(None)  # a connection slot is free: the waiter may connect

    def fail_waiters(self) -> None:
        """The endpoint left its cluster: let every waiter connect (or fail) on its own."""
        while self.waiters:
            w = self.waiters.popleft()
            if self.counters is not None:
                self.counters.rq_pending -= 1
            w(None)

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget ``conn`` (closed, or about to be): it is never handed out again."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def is_idle(self, conn: UpstreamConnection) -> bool:
        return conn in self.idle

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def __repr__(self) -> str:
        return (
            f"EndpointState({self.key}, active={self.active}, idle={len(self.idle)},"
            f" opened={self.opened}{', removed' if self.removed else ''})"
        )


class _ActiveView(Sequence[int]):
    """Active request counts by endpoint index, read live by least-request pickers."""

    __slots__ = ("_eps",)

    def __init__(self, eps: list[EndpointState]) -> None:
        self._eps = eps

    def __len__(self) -> int:
        return len(self._eps)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [e.active for e in self._eps[i]]
        return self._eps[i].active

    def __iter__(self) -> Iterator[int]:
        return (e.active for e in self._eps)


class ClusterState:
    """One cluster's endpoints and picker, for one definition of the cluster."""

    __slots__ = (
        "active",
        "cluster",
        "counters",
        "detector",
        "endpoints",
        "idle_timeout",
        "limit_connections",
        "name",
        "picker",
        "single",
        "sweep_at",
        "sweep_timer",
        "tls",
    )

    def __init__(
        self,
        cluster: Cluster,
        endpoints: list[EndpointState],
        settings: Settings,
        counters: ClusterCounters | None = None,
    ) -> None:
        self.cluster = cluster
        self.name = cluster.name
        self.endpoints = endpoints
        self.counters = counters if counters is not None else ClusterCounters()
        for i, st in enumerate(endpoints):
            st.index = i
            st.counters = self.counters
            if cluster.outlier is None and st.health.ejected:
                st.health = HostHealth()  # outlier detection was removed: nothing is ejected
        self.picker: Picker = make_picker(cluster)
        self.active = _ActiveView(endpoints)
        self.idle_timeout = min(settings.upstream_idle_timeout, cluster.pool.idle_timeout)
        self.limit_connections = cluster.pool.max_connections != _UNLIMITED
        self.detector: OutlierDetector | None = None
        self.sweep_timer: asyncio.TimerHandle | None = None
        self.sweep_at = 0.0  # loop time of the next sweep (carried over by a redefinition)
        self.tls: ClientTls | None = None  # set by Pools._apply_tls; None = plaintext
        if cluster.outlier is not None and endpoints:
            self.detector = OutlierDetector(
                cluster.outlier,
                [st.health for st in endpoints],
                min_ejectable=settings.outlier_min_ejectable,
            )
        # One endpoint of non-zero weight and no outlier detection: no picker call needed
        # (callers may test it first).
        self.single = (
            endpoints[0]
            if len(endpoints) == 1 and endpoints[0].endpoint.weight and self.detector is None
            else None
        )

    def pick(
        self,
        rand: float,
        hash_key: bytes | None = None,
        avoid: Sequence[EndpointState] = (),
    ) -> EndpointState | None:
        """The endpoint for the next request, or None (no endpoint available: 503 UH).

        Ejected endpoints are skipped (unless the detector is in panic). ``avoid`` lists
        endpoints a retry already tried (Envoy's ``previous_hosts`` predicate): they are
        skipped too while another endpoint is available, else the pick ignores ``avoid``.
        """
        if self.single is not None:
            return self.single
        eps = self.endpoints
        if not eps:
            return None
        det = self.detector
        available = det.available if det is not None else None
        if avoid:
            mask = list(available) if available is not None else [True] * len(eps)
            for st in avoid:
                i = st.index
                if i < len(eps) and eps[i] is st:
                    mask[i] = False
            if any(mask):
                i = self.picker.pick(rand, self.active, mask, hash_key)
                if i is not None:
                    return eps[i]
        i = self.picker.pick(rand, self.active, available, hash_key)
        if i is None:
            return None
        return eps[i]

    def stop_sweeps(self) -> None:
        if self.sweep_timer is not None:
            self.sweep_timer.cancel()
            self.sweep_timer = None

    def can_connect(self, ep: EndpointState) -> bool:
        """Whether ``ep`` may open another connection under ``max_connections`` (an
        endpoint without connections always may, as in Envoy's pool)."""
        if not self.limit_connections or ep.conns == 0:
            return True
        return self.counters.cx_active < self.cluster.pool.max_connections

    @property
    def tls_info(self) -> dict[str, Any] | None:
        """For ``/clusters``: the cluster's upstream TLS (mode, auto, sni, subject_alt_names,
        the last verified peer, handshakes, resumed), None for plaintext."""
        return self.tls.info if self.tls is not None else None

    def __repr__(self) -> str:
        tls = f", tls={self.tls.mode.value}" if self.tls is not None else ""
        return f"ClusterState({self.name}{tls}, endpoints={self.endpoints!r})"


class Pools:
    """All clusters' live state; the only owner of upstream connections."""

    def __init__(self, metrics: Metrics, settings: Settings) -> None:
        self._metrics = metrics
        self._settings = settings
        self._clusters: dict[str, ClusterState] = {}
        self._counters: dict[str, ClusterCounters] = {}
        self._closed = False
        # set on first connect: asyncio.get_running_loop() costs a getpid() syscall
        self._loop: asyncio.AbstractEventLoop | None = None
        self._identity: IdentityStore | None = None
        self.file_contexts = FileContexts()
        self._tls_logged: set[str] = set()  # TLS problems said once each

    # ------------------------------------------------------------------ identity

    @property
    def identity(self) -> IdentityStore | None:
        """The workload identity ISTIO_MUTUAL and auto-mTLS connections present (set by the
        composition root after construction; clusters are re-armed on every rotation)."""
        return self._identity

    @identity.setter
    def identity(self, store: IdentityStore | None) -> None:
        self._identity = store
        if store is not None:
            store.subscribe(self._on_identity)
        self._on_identity(None, None)

    def _on_identity(self, old: WorkloadIdentity | None, new: WorkloadIdentity | None) -> None:
        """``IdentityStore.subscribe`` listener: new connections use the new certificate; idle
        connections made with the old one are closed (busy ones finish, then close)."""
        for cs in self._clusters.values():
            if cs.cluster.tls is not None:
                self._apply_tls(cs)

    def _current_identity(self) -> WorkloadIdentity | None:
        store = self._identity
        return store.current if store is not None else None

    def _apply_tls(self, cs: ClusterState) -> None:
        """Compute ``cs.tls`` for the cluster's policy and the current identity, and key the
        endpoints' pools on it (a new :class:`TlsKey` wherever the context, SNI, names or
        the endpoint's expected peer changed: connections verified otherwise are retired)."""
        cs.tls = tls = self._client_tls(cs.cluster)
        for st in cs.endpoints:
            st.set_tls_key(tls.key_for(st.key, st.tls_key) if tls is not None else None)

    def _client_tls(self, cluster: Cluster) -> ClientTls | None:
        pol = cluster.tls
        if pol is None or pol.mode is TlsMode.DISABLE:
            return None
        ident = self._current_identity()
        if pol.mode is TlsMode.ISTIO_MUTUAL:
            if ident is None:
                if pol.auto:
                    return None  # auto-mTLS only with a workload identity
                return ClientTls(
                    pol.mode,
                    error=f"{cluster.name}: tls mode ISTIO_MUTUAL needs a workload identity"
                    " (run with --cert-dir)",
                )
            peer_ids: dict[str, str] = {}
            if not pol.subject_alt_names:
                for ep in cluster.endpoints:
                    if ep.service_account:
                        ns = ep.meta.namespace if ep.meta is not None else ""
                        ns = ns or cluster.service_namespace or "default"
                        peer_ids[ep.key] = ident.spiffe_id_for(ns, ep.service_account)
            store = self._identity
            return ClientTls(
                pol.mode,
                auto=pol.auto,
                ctx=ident.client_context,
                sni=pol.sni or istio_sni(cluster),
                sans=pol.subject_alt_names,
                peer_ids=peer_ids,
                generation=store.generation if store is not None else 0,
            )
        verify = not pol.insecure_skip_verify
        files = tls_file_spec(pol)
        host = cluster.host
        sni = pol.sni or (None if host.startswith("*") else host)
        # insecureSkipVerify skips the name check too (no verified certificate to read)
        sans = pol.subject_alt_names if verify else ()
        if not sans and verify and not pol.sni and sni is not None:
            sans = (sni,)  # Envoy's auto SNI SAN validation: the server is the host
        return ClientTls(
            pol.mode,
            ctx=self.file_contexts.cached(files),
            sni=sni,
            sans=sans,
            files=files,
        )

    def _tls_problem(self, cs: ClusterState, message: str) -> None:
        """Log a TLS setup problem of ``cs`` once (every connect fails the same way)."""
        key = f"{cs.name}\0{message}"
        if key not in self._tls_logged:
            if len(self._tls_logged) > 1000:
                self._tls_logged.clear()
            self._tls_logged.add(key)
            log.error("upstream TLS for %s: %s", cs.name, message)

    # ------------------------------------------------------------------ state

    def cluster_state(self, cluster: Cluster) -> ClusterState:
        """The live state for ``cluster`` (built on first use, rebuilt if it changed)."""
        cs = self._clusters.get(cluster.name)
        if cs is not None and cs.cluster is cluster:
            return cs
        return self._update(cluster, cs)

    def keyed_state(self, key: str, cluster: Cluster) -> ClusterState:
        """The live state of ``cluster`` kept under ``key`` instead of its name: for clusters
        the data plane makes itself, several under one name (Istio's ``PassthroughCluster``:
        one state per original destination). Like every cluster the new snapshot does not
        name, it is dropped at the next snapshot swap; :meth:`drop` forgets it sooner."""
        cs = self._clusters.get(key)
        if cs is not None and cs.cluster is cluster:
            return cs
        return self._update(cluster, cs, key)

    def drop(self, key: str) -> None:
        """Forget the cluster state under ``key``: idle connections close, waiters fail,
        requests in flight finish on their connections (which are then closed)."""
        cs = self._clusters.pop(key, None)
        self._counters.pop(key, None)
        if cs is None:
            return
        cs.stop_sweeps()
        for st in cs.endpoints:
            st.removed = True
            st.close_idle()
            st.fail_waiters()

    def _update(
        self, cluster: Cluster, old: ClusterState | None, key: str | None = None
    ) -> ClusterState:
        if old is not None and old.cluster == cluster:
            old.cluster = cluster  # equal definition: keep state, remember the new object
            return old
        previous: dict[tuple[str, int], EndpointState] = {}
        if old is not None:
            previous = {(e.address, e.port): e for e in old.endpoints}
        eps: list[EndpointState] = []
        for ep in cluster.endpoints:
            st = previous.pop((ep.address, ep.port), None)
            if st is None:
                st = EndpointState(ep)
            else:
                st.endpoint = ep
            eps.append(st)
        for gone in previous.values():
            gone.removed = True
            gone.close_idle()
            gone.fail_waiters()
        next_sweep: float | None = None
        if old is not None:
            if old.sweep_timer is not None:
                next_sweep = old.sweep_at
            old.stop_sweeps()
        name = cluster.name if key is None else key
        counters = self._counters.get(name)
        if counters is None:
            counters = self._counters[name] = ClusterCounters()
        cs = ClusterState(cluster, eps, self._settings, counters)
        self._clusters[name] = cs
        self._apply_tls(cs)
        if cs.detector is not None:
            # a redefinition keeps the sweep's rhythm: redefined more often than `interval`
            # (endpoint churn), the cluster would otherwise never un-eject anybody
            self._schedule_sweep(cs, next_sweep)
        return cs

    # ------------------------------------------------------------------ outlier detection

    def _schedule_sweep(self, cs: ClusterState, at: float | None = None) -> None:
        """Arm ``cs``'s next sweep: at loop time ``at`` (carried over), else one interval
        from now."""
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # built outside an event loop (unit tests): no timer
                return
        assert cs.cluster.outlier is not None
        now = loop.time()
        interval = cs.cluster.outlier.interval
        when = now + interval if at is None else min(max(at, now), now + interval)
        cs.sweep_at = when
        cs.sweep_timer = loop.call_at(when, self.sweep, cs)

    def sweep(self, cs: ClusterState) -> None:
        """The outlier detector's interval: un-eject endpoints whose time is up, then
        re-arm (only while ``cs`` is the cluster's current state)."""
        cs.sweep_timer = None
        det = cs.detector
        if det is None or self._clusters.get(cs.name) is not cs or self._closed:
            return
        for i in det.sweep(time.monotonic()):
            log.info(
                "outlier detection: %s endpoint %s returned to the load balancer",
                cs.name,
                cs.endpoints[i].key,
            )
        self._schedule_sweep(cs)

    def ejected(self, cs: ClusterState, ep: EndpointState, reason: str, duration: float) -> None:
        """An attempt's report made the detector eject ``ep``: count it and say so."""
        self._metrics.outlier_ejection(cs.name)
        log.warning(
            "outlier detection: %s endpoint %s ejected for %.1f s (%s, ejection #%d)",
            cs.name,
            ep.key,
            duration,
            reason,
            ep.health.ejections_total,
        )

    def on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        """``State.subscribe`` listener: re-pick changed clusters, drop vanished ones."""
        for name in list(self._clusters):
            cluster = new.clusters.get(name)
            if cluster is None:
                self.drop(name)
            else:
                self._update(cluster, self._clusters[name])

    def states(self) -> dict[str, ClusterState]:
        return self._clusters

    # ------------------------------------------------------------------ connections

    def take_idle(self, ep: EndpointState) -> UpstreamConnection | None:
        """A pooled keep-alive connection to ``ep``, or None."""
        idle = ep.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.tls_key is not ep.tls_key:  # made with another TLS identity
                conn.close()
                continue
            return conn
        return None

    def reserve(self, cs: ClusterState, ep: EndpointState) -> None:
        """Count a connection to ``ep`` that is about to be opened, synchronously, when the
        decision to connect is made: a connection holds its ``max_connections`` slot from then
        on (Envoy counts connecting clients too), so a burst on a cold endpoint queues behind
        the first connect instead of opening one connection per request. Every ``reserve``
        is followed by ``connect(cs, ep, reserved=True)`` or by ``ep.connection_closed()``."""
        ep.counters = cs.counters
        ep.conns += 1
        cs.counters.cx_active += 1

    async def connect(
        self, cs: ClusterState, ep: EndpointState, *, reserved: bool = False
    ) -> UpstreamConnection:
        """Open a new connection to ``ep`` within the cluster's connect timeout (counted from
        the start, TLS handshake included; ``reserved``: :meth:`reserve` counted it already).
        A failed or cancelled connect gives its slot back (a waiter of ``ep`` may then
        connect). Every failure is a :class:`ConnectFailure`, ``tls`` set when the TCP
        connection was made but TLS (files, handshake, peer identity) failed."""
        loop = self._loop = asyncio.get_running_loop()
        s = self._settings
        if not reserved:
            self.reserve(cs, ep)
        tls = cs.tls
        proto: UpstreamConnection | None = None
        layer: TlsLayer | None = None
        try:
            async with asyncio.timeout(cs.cluster.pool.connect_timeout):
                if tls is None:
                    _, proto = await loop.create_connection(
                        lambda: UpstreamConnection(ep, s.high_water, s.low_water),
                        ep.address,
                        ep.port,
                    )
                else:
                    ctx = await self._tls_ready(cs, tls)
                    # the key this connection is pooled under: the endpoint's when it stands
                    # for what this handshake verifies, else one of its own (never pooled)
                    key = ep.tls_key
                    peer = tls.expected_peer(ep.key)
                    if key is None or not key.matches(tls, ctx, peer):
                        key = TlsKey(tls, ctx, peer)
                    saved = ep.tls_session
                    session = saved[1] if saved is not None and saved[0] is key else None
                    inner = UpstreamConnection(ep, s.high_water, s.low_water)
                    try:
                        layer = TlsLayer(
                            ctx,
                            inner,
                            server_side=False,
                            server_hostname=tls.sni,
                            session=session,
                            loop=loop,
                        )
                    except (ValueError, ssl.SSLError) as e:  # an SNI ssl cannot encode
                        raise ConnectFailure(f"{ep.key}: TLS: {_ssl_reason(e)}", tls=True) from None
                    await loop.create_connection(lambda: layer, ep.address, ep.port)
                    proto = inner  # TCP is up: from here on a failure is a TLS failure
                    await self._handshake(ep, tls, key, layer)
        except BaseException as e:
            if layer is not None:
                layer.abort()
            if proto is not None:
                proto.abort()
            ep.connection_closed()  # the slot is free again (a waiter may connect)
            if isinstance(e, ConnectFailure) or not isinstance(
                e, OSError | TimeoutError | ValueError | RuntimeError
            ):
                raise  # already classified, or cancelled (the attempt was abandoned)
            if proto is None and isinstance(e, ValueError | RuntimeError):
                raise  # not a network outcome: a bug, reported as such by the caller
            if proto is not None:  # TCP was up: the handshake failed or timed out
                raise ConnectFailure(
                    f"{ep.key}: TLS handshake: {_ssl_reason(e)}", tls=True
                ) from None
            raise ConnectFailure(f"{ep.key}: {e or type(e).__name__}") from None
        ep.opened += 1
        self._metrics.upstream_connection_opened(cs.name)
        assert isinstance(proto, UpstreamConnection)
        proto.counted = True
        if proto.closed:  # lost before we got here: connection_lost did not count it
            proto.counted = False
            ep.connection_closed()
            raise ConnectFailure(f"{ep.key}: closed as soon as it was opened", tls=tls is not None)
        return proto

    async def _tls_ready(self, cs: ClusterState, tls: ClientTls) -> ssl.SSLContext:
        """The context a new connection of ``tls`` handshakes with (SIMPLE / MUTUAL: from
        the files, reloaded when they change; it is the caller's to use even if ``cs.tls``
        was replaced meanwhile); raise ConnectFailure(tls=True) when there is none."""
        if tls.error is not None:
            self._tls_problem(cs, tls.error)
            raise ConnectFailure(tls.error, tls=True)
        if tls.files is None:
            if tls.ctx is None:  # not built by _client_tls: cannot happen, but never plaintext
                raise ConnectFailure(f"{cs.name}: no TLS context", tls=True)
            return tls.ctx
        try:
            ctx = await self.file_contexts.get(tls.files)
        except ConnectFailure as e:
            self._tls_problem(cs, str(e))
            raise
        if ctx is not tls.ctx and cs.tls is tls and self._clusters.get(cs.name) is cs:
            # new files: new connections use them, pooled ones are retired (only for the
            # cluster's current definition: endpoint states are shared with a newer one)
            tls.ctx = ctx
            for st in cs.endpoints:
                st.set_tls_key(tls.key_for(st.key, st.tls_key))
        return ctx

    async def _handshake(
        self,
        ep: EndpointState,
        tls: ClientTls,
        key: TlsKey,
        layer: TlsLayer,
    ) -> None:
        """Wait for ``layer``'s handshake (offering the endpoint's saved session), then check
        the peer; the connection is pooled under ``key``."""
        await layer.handshake
        proto = layer.inner
        assert isinstance(proto, UpstreamConnection)
        obj = layer.ssl_object
        peer = tls.check_peer(ep, obj)  # raises on a wrong peer
        proto.tls_key = key
        proto.tls_pending = True  # save the session after the first response (its ticket)
        info = tls.info
        info["peer"] = peer
        info["handshakes"] += 1
        if obj.session_reused:
            info["resumed"] += 1

    def release(self, conn: UpstreamConnection, reusable: bool, cs: ClusterState) -> None:
        """Return ``conn`` after a request: back to the idle stack or closed."""
        conn.sink = None  # conn.unbind(), without the call
        ep = conn.endpoint
        if conn.tls_key is not ep.tls_key:  # made with a retired TLS identity: not pooled
            reusable = False
        if ep.waiters and reusable and not conn.closed and not ep.removed and not self._closed:
            limit = cs.cluster.pool.max_requests_per_connection
            if not limit or conn.requests < limit:
                w = ep.waiters.popleft()
                cs.counters.rq_pending -= 1
                w(conn)  # straight to the attempt waiting for a connection
                return
        if (
            not reusable
            or conn.closed
            or ep.removed
            or self._closed
            or len(ep.idle) >= self._settings.max_idle_per_endpoint
        ):
            conn.close()
            return
        limit = cs.cluster.pool.max_requests_per_connection
        if limit and conn.requests >= limit:
            conn.close()
            return
        ep.idle.append(conn)
        loop = self._loop
        if loop is None:  # a connection made outside connect() (tests)
            loop = self._loop = asyncio.get_running_loop()
        conn.arm_idle_timer(loop, cs.idle_timeout)

    def idle_connections(self) -> int:
        return sum(len(e.idle) for cs in self._clusters.values() for e in cs.endpoints)

    def close(self) -> None:
        """Close every pooled connection; later releases close theirs."""
        self._closed = True
        for cs in self._clusters.values():
            cs.stop_sweeps()
            for st in cs.endpoints:
                st.close_idle()

    def __repr__(self) -> str:
        return f"Pools({list(self._clusters.values())!r})"
