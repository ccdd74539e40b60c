"""Fakes for data-plane tests: a Metrics that records every call, and snapshot builders.

:class:`FakeMetrics` implements the interface ``meshproxy.metrics.Metrics`` offers the data
plane (``record_request``, ``upstream_connection_opened``, ``downstream_connections``) and keeps
every call, so tests assert on response codes and flags exactly as the metrics would see them.
:func:`service_snapshot` builds a :class:`~meshproxy.config.model.Snapshot` with one virtual host
routing to one cluster, the shape most data-path tests need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshproxy.config.model import (
    Cluster,
    Endpoint,
    LoadBalancer,
    Meta,
    Route,
    RouteTable,
    Snapshot,
    VirtualHost,
    WeightedCluster,
)


@dataclass
class RecordedRequest:
    cluster: str | None
    code: int
    flags: str
    duration_s: float
    request_bytes: int
    response_bytes: int


@dataclass
class FakeMetrics:
    requests: list[RecordedRequest] = field(default_factory=list)
    opened: dict[str, int] = field(default_factory=dict)
    downstream: int = 0
    downstream_total: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def record_request(
        self,
        cluster: Cluster | None,
        code: int,
        flags: str,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        self.requests.append(
            RecordedRequest(
                cluster.name if cluster is not None else None,
                code,
                flags,
                duration_s,
                request_bytes,
                response_bytes,
            )
        )

    def upstream_connection_opened(self, cluster_name: str) -> None:
        self.opened[cluster_name] = self.opened.get(cluster_name, 0) + 1

    def _count(self, what: str, cluster_name: str) -> None:
        d = self.counts.setdefault(what, {})
        d[cluster_name] = d.get(cluster_name, 0) + 1

    def upstream_retry(self, cluster_name: str) -> None:
        self._count("retries", cluster_name)

    def upstream_overflow(self, cluster_name: str) -> None:
        self._count("overflows", cluster_name)

    def upstream_retry_overflow(self, cluster_name: str) -> None:
        self._count("retry_overflows", cluster_name)

    def outlier_ejection(self, cluster_name: str) -> None:
        self._count("ejections", cluster_name)

    def count(self, what: str) -> int:
        """Total of one counter (retries, overflows, retry_overflows, ejections)."""
        return sum(self.counts.get(what, {}).values())

    def downstream_connections(self, delta: int) -> None:
        self.downstream += delta
        if delta > 0:
            self.downstream_total += delta

    def on_snapshot(self, old: Snapshot, new: Snapshot) -> None:  # pragma: no cover - parity
        pass


META = Meta(kind="VirtualService", name="test")


def cluster(name: str, ports: list[int], address: str = "127.0.0.1", **kw: object) -> Cluster:
    eps = tuple(Endpoint(address=address, port=p) for p in ports)
    return Cluster(
        name=name,
        host=name,
        port=80,
        endpoints=eps,
        meta=Meta(kind="ServiceEntry", name=name),
        **kw,  # type: ignore[arg-type]
    )


def vhost(host: str, routes: tuple[Route, ...], aliases: tuple[str, ...] = ()) -> VirtualHost:
    return VirtualHost(name=host, meta=META, domains=(host, *aliases), routes=routes)


def to_cluster(name: str, **kw: object) -> Route:
    wc = WeightedCluster(cluster=name, weight=100, host=name)
    return Route(name="r", meta=META, clusters=(wc,), total_weight=100, **kw)  # type: ignore[arg-type]


def snapshot(vhosts: list[VirtualHost], clusters: list[Cluster], version: str = "v1") -> Snapshot:
    exact = {}
    for vh in vhosts:
        for d in vh.domains:
            exact[d] = vh
    return Snapshot(
        version=version,
        routes=RouteTable(exact=exact),
        clusters={c.name: c for c in clusters},
    )


def service_snapshot(
    host: str, ports: list[int], *, lb: LoadBalancer | None = None, version: str = "v1"
) -> Snapshot:
    """``host`` routed (every request) to cluster ``host`` with endpoints 127.0.0.1:ports."""
    kw: dict[str, object] = {}
    if lb is not None:
        kw["lb"] = lb
    c = cluster(host, ports, **kw)
    return snapshot([vhost(host, (to_cluster(host),))], [c], version)
