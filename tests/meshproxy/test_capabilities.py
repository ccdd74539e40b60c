"""meshproxy.capabilities: configured features the data plane does not apply are named."""

from __future__ import annotations

from meshproxy.capabilities import unsupported
from meshproxy.config.model import (
    DEFAULT_RETRY,
    Cluster,
    ConnectionPool,
    FaultPolicy,
    Meta,
    OutlierPolicy,
    RetryPolicy,
    Route,
    RouteTable,
    Snapshot,
    TlsMode,
    TlsPolicy,
    VirtualHost,
    WeightedCluster,
)

VS = Meta("VirtualService", "reviews", "default", "vs.yaml", "spec.http[0]")
DR = Meta("DestinationRule", "reviews", "default", "dr.yaml", "spec.trafficPolicy")


def snap(routes: tuple[Route, ...], clusters: tuple[Cluster, ...] = ()) -> Snapshot:
    vh = VirtualHost("reviews", VS, ("reviews",), routes)
    table = RouteTable(exact={"reviews": vh, "reviews.default": vh})  # aliases share it
    return Snapshot("v", routes=table, clusters={c.name: c for c in clusters})


def route(**kw: object) -> Route:
    wc = WeightedCluster("reviews", 100, "reviews")
    return Route("r", VS, clusters=(wc,), total_weight=100, **kw)  # type: ignore[arg-type]


def test_defaults_are_not_reported() -> None:
    plain = Cluster("reviews", "reviews", 80, policy_meta=DR)
    assert unsupported(snap((route(retries=DEFAULT_RETRY),), (plain,))) == []
    # honoured pool settings are not reported either
    pooled = Cluster("c", "c", 80, pool=ConnectionPool(connect_timeout=1.0, idle_timeout=5.0))
    assert unsupported(snap((route(),), (pooled,))) == []


def test_applied_resilience_features_are_not_reported() -> None:
    routes = (
        route(fault=FaultPolicy(abort_status=500, abort_fraction=1.0)),
        route(fault=FaultPolicy(delay=1.0, delay_fraction=0.5), timeout=2.0),
        route(retries=RetryPolicy(attempts=5)),
    )
    clusters = (
        Cluster("a", "a", 80, outlier=OutlierPolicy(), policy_meta=DR),
        Cluster("b", "b", 80, pool=ConnectionPool(max_connections=1), policy_meta=DR),
    )
    assert unsupported(snap(routes, clusters)) == []


def test_each_unapplied_feature_is_named_once_with_count_and_first_resource() -> None:
    routes = (
        route(retries=RetryPolicy(attempts=5, retry_remote_localities=True)),
        route(retries=RetryPolicy(attempts=1, retry_remote_localities=True)),
    )
    clusters = (
        Cluster("c", "c", 80, tls=TlsPolicy(mode=TlsMode.ISTIO_MUTUAL), policy_meta=DR),
        Cluster("d", "d", 80, tls=TlsPolicy(mode=TlsMode.DISABLE), policy_meta=DR),
    )
    lines = unsupported(snap(routes, clusters))
    assert len(lines) == 1  # upstream TLS is applied now: only retryRemoteLocalities is named
    by_feature = {ln.split(": ", 1)[1].split(", set on")[0]: ln for ln in lines}
    assert (
        "set on 2 entries, first in VirtualService/default/reviews spec.http[0] (vs.yaml)"
        in by_feature["`retries.retryRemoteLocalities`"]
    )
    assert not any("TLS" in ln for ln in lines)
