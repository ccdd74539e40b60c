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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from meshproxy.config.model import Cluster, ConnectionPool, Endpoint, Snapshot
from meshproxy.core.balance import Picker, make_picker
from meshproxy.core.outlier import HostHealth, OutlierDetector
from meshproxy.settings import Settings
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

    def __repr__(self) -> str:
        return f"ClusterState({self.name}, endpoints={self.endpoints!r})"


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

    # ------------------------------------------------------------------ state

    def cluster_state(self, cluster: Cluster) -> ClusterState:
        """The live state for ``cluster`` (built on first use, rebuilt if it changed)."""
        cs = self._clusters.get(cluster.name)
        if cs is not None and cs.cluster is cluster:
            return cs
        return self._update(cluster, cs)

    def _update(self, cluster: Cluster, old: ClusterState | None) -> ClusterState:
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
        tls_changed = old is not None and old.cluster.tls != cluster.tls
        for gone in previous.values():
            gone.removed = True
            gone.close_idle()
            gone.fail_waiters()
        if tls_changed:
            for st in eps:
                st.close_idle()
        next_sweep: float | None = None
        if old is not None:
            if old.sweep_timer is not None:
                next_sweep = old.sweep_at
            old.stop_sweeps()
        counters = self._counters.get(cluster.name)
        if counters is None:
            counters = self._counters[cluster.name] = ClusterCounters()
        cs = ClusterState(cluster, eps, self._settings, counters)
        self._clusters[cluster.name] = cs
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
                cs = self._clusters.pop(name)
                self._counters.pop(name, None)
                cs.stop_sweeps()
                for st in cs.endpoints:
                    st.removed = True
                    st.close_idle()
                    st.fail_waiters()
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
            if not conn.closed:
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
        the start; ``reserved``: :meth:`reserve` counted it already). A failed or cancelled
        connect gives its slot back (a waiter of ``ep`` may then connect)."""
        loop = self._loop = asyncio.get_running_loop()
        s = self._settings
        if not reserved:
            self.reserve(cs, ep)
        try:
            async with asyncio.timeout(cs.cluster.pool.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(ep, s.high_water, s.low_water),
                    ep.address,
                    ep.port,
                )
        except (OSError, TimeoutError) as e:
            ep.connection_closed()  # the slot is free again (a waiter may connect)
            raise ConnectFailure(f"{ep.key}: {e or type(e).__name__}") from None
        except BaseException:  # cancelled: the attempt was abandoned
            ep.connection_closed()
            raise
        ep.opened += 1
        self._metrics.upstream_connection_opened(cs.name)
        assert isinstance(proto, UpstreamConnection)
        proto.counted = True
        if proto.closed:  # lost before we got here: connection_lost did not count it
            proto.counted = False
            ep.connection_closed()
            raise ConnectFailure(f"{ep.key}: closed as soon as it was opened")
        return proto

    def release(self, conn: UpstreamConnection, reusable: bool, cs: ClusterState) -> None:
        """Return ``conn`` after a request: back to the idle stack or closed."""
        conn.sink = None  # conn.unbind(), without the call
        ep = conn.endpoint
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
