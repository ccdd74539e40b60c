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

A connection goes back to the idle stack only when its last response was complete and
keep-alive, the request was fully sent, ``max_requests_per_connection`` is not reached, the
endpoint still exists and the stack is below ``Settings.max_idle_per_endpoint``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from meshproxy.config.model import Cluster, Endpoint, Snapshot
from meshproxy.core.balance import Picker, make_picker
from meshproxy.settings import Settings
from meshproxy.upstream.connection import UpstreamConnection

if TYPE_CHECKING:
    from meshproxy.metrics import Metrics


class ConnectFailure(Exception):
    """The TCP connect to an endpoint failed (refused, unreachable, timed out)."""


class EndpointState:
    """Run-time state of one endpoint (shared by every ``ClusterState`` generation)."""

    __slots__ = (
        "active",
        "address",
        "ejected",
        "ejections",
        "endpoint",
        "healthy",
        "idle",
        "key",
        "opened",
        "port",
        "removed",
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
        self.healthy = True
        self.ejected = False
        self.ejections = 0

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

    __slots__ = ("active", "cluster", "endpoints", "idle_timeout", "name", "picker", "single")

    def __init__(
        self, cluster: Cluster, endpoints: list[EndpointState], settings: Settings
    ) -> None:
        self.cluster = cluster
        self.name = cluster.name
        self.endpoints = endpoints
        self.picker: Picker = make_picker(cluster)
        self.active = _ActiveView(endpoints)
        self.idle_timeout = min(settings.upstream_idle_timeout, cluster.pool.idle_timeout)
        # One endpoint of non-zero weight: no picker call needed (callers may test it first).
        self.single = endpoints[0] if len(endpoints) == 1 and endpoints[0].endpoint.weight else None

    def pick(self, rand: float, hash_key: bytes | None = None) -> EndpointState | None:
        """The endpoint for the next request, or None (no endpoint available: 503 UH)."""
        if self.single is not None:
            return self.single
        eps = self.endpoints
        if not eps:
            return None
        i = self.picker.pick(rand, self.active, None, hash_key)
        if i is None:
            return None
        return eps[i]

    def __repr__(self) -> str:
        return f"ClusterState({self.name}, endpoints={self.endpoints!r})"


class Pools:
    """All clusters' live state; the only owner of upstream connections."""

    def __init__(self, metrics: Metrics, settings: Settings) -> None:
        self._metrics = metrics
        self._settings = settings
        self._clusters: dict[str, ClusterState] = {}
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
        if tls_changed:
            for st in eps:
                st.close_idle()
        cs = ClusterState(cluster, eps, self._settings)
        self._clusters[cluster.name] = cs
        return cs

    def on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        """``State.subscribe`` listener: re-pick changed clusters, drop vanished ones."""
        for name in list(self._clusters):
            cluster = new.clusters.get(name)
            if cluster is None:
                cs = self._clusters.pop(name)
                for st in cs.endpoints:
                    st.removed = True
                    st.close_idle()
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

    async def connect(self, cs: ClusterState, ep: EndpointState) -> UpstreamConnection:
        """Open a new connection to ``ep`` within the cluster's connect timeout."""
        loop = self._loop = asyncio.get_running_loop()
        s = self._settings
        try:
            async with asyncio.timeout(cs.cluster.pool.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(ep, s.high_water, s.low_water),
                    ep.address,
                    ep.port,
                )
        except (OSError, TimeoutError) as e:
            raise ConnectFailure(f"{ep.key}: {e or type(e).__name__}") from None
        ep.opened += 1
        self._metrics.upstream_connection_opened(cs.name)
        assert isinstance(proto, UpstreamConnection)
        return proto

    def release(self, conn: UpstreamConnection, reusable: bool, cs: ClusterState) -> None:
        """Return ``conn`` after a request: back to the idle stack or closed."""
        conn.sink = None  # conn.unbind(), without the call
        ep = conn.endpoint
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
            for st in cs.endpoints:
                st.close_idle()

    def __repr__(self) -> str:
        return f"Pools({list(self._clusters.values())!r})"
