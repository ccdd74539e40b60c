"""Metrics: hot-path accumulation and the Prometheus text rendering (no sockets, no loop)."""

from __future__ import annotations

import gc

from prometheus_client.parser import text_string_to_metric_families

from meshproxy.config.model import Cluster, Endpoint, ProxyIdentity, Snapshot
from meshproxy.metrics import (
    DURATION_BUCKETS_MS,
    ISTIO_LABELS,
    SIZE_BUCKETS,
    Metrics,
    merge_exports,
    render,
)


def _cluster(subset: str | None = "v1", versions: tuple[str, ...] = ("v1",)) -> Cluster:
    eps = tuple(
        Endpoint(address="127.0.0.1", port=9000 + i, labels={"app": "reviews", "version": v})
        for i, v in enumerate(versions)
    )
    name = "reviews.default.svc.cluster.local" + (f"|{subset}" if subset else "")
    return Cluster(
        name=name,
        host="reviews.default.svc.cluster.local",
        port=9080,
        subset=subset,
        endpoints=eps,
        service_name="reviews",
        service_namespace="default",
    )


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(fam, suffix: str = "") -> list:
    return [s for s in fam.samples if s.name == fam.name + suffix]


def _buckets(fam) -> dict[float, float]:
    return {float(s.labels["le"]): s.value for s in _samples(fam, "_bucket")}


def test_requests_total_has_istio_labels() -> None:
    m = Metrics(ProxyIdentity(namespace="shop", labels={"app": "productpage", "version": "v1"}))
    c = _cluster()
    for _ in range(3):
        m.record_request(c, 200, "-", 0.003, 10, 2000)
    m.record_request(None, 404, "NR", 0.0001, 0, 0)
    fams = _families(m.render())
    samples = _samples(fams["istio_requests"], "_total")
    assert len(samples) == 2
    by_code = {s.labels["response_code"]: s for s in samples}
    ok = by_code["200"]
    assert ok.value == 3
    assert set(ok.labels) == set(ISTIO_LABELS)
    assert ok.labels["reporter"] == "source"
    assert ok.labels["source_app"] == "productpage"
    assert ok.labels["source_version"] == "v1"
    assert ok.labels["source_workload_namespace"] == "shop"
    assert ok.labels["destination_service"] == "reviews.default.svc.cluster.local"
    assert ok.labels["destination_service_name"] == "reviews"
    assert ok.labels["destination_service_namespace"] == "default"
    assert ok.labels["destination_version"] == "v1"
    assert ok.labels["destination_app"] == "reviews"
    assert ok.labels["response_flags"] == "-"
    assert ok.labels["request_protocol"] == "http"
    assert ok.labels["connection_security_policy"] == "unknown"
    nr = by_code["404"]
    assert nr.labels["response_flags"] == "NR"
    assert nr.labels["destination_service"] == "unknown"
    assert nr.value == 1


def test_mixed_versions_give_unknown_version() -> None:
    m = Metrics()
    m.record_request(_cluster(None, ("v1", "v2")), 200, "-", 0.001, 0, 0)
    (s,) = _samples(_families(m.render())["istio_requests"], "_total")
    assert s.labels["destination_version"] == "unknown"
    assert s.labels["source_app"] == "unknown"


def test_duration_histogram_buckets_are_cumulative() -> None:
    m = Metrics()
    c = _cluster()
    m.record_request(c, 200, "-", 0.0004, 0, 0)  # 0.4 ms -> le 0.5
    m.record_request(c, 200, "-", 0.001, 0, 0)  # exactly 1 ms -> le 1
    m.record_request(c, 200, "-", 0.2, 0, 0)  # 200 ms -> le 250
    m.record_request(c, 200, "-", 7200.0, 0, 0)  # beyond the last bucket -> +Inf only
    fam = _families(m.render())["istio_request_duration_milliseconds"]
    buckets = {float(s.labels["le"]): s.value for s in _samples(fam, "_bucket")}
    assert len(buckets) == len(DURATION_BUCKETS_MS) + 1
    assert buckets[0.5] == 1
    assert buckets[1.0] == 2
    assert buckets[100.0] == 2
    assert buckets[250.0] == 3
    assert buckets[3600000.0] == 3
    assert buckets[float("inf")] == 4
    (count,) = _samples(fam, "_count")
    assert count.value == 4
    (total,) = _samples(fam, "_sum")
    assert abs(total.value - (0.4 + 1 + 200 + 7_200_000)) < 1e-6


def test_size_histograms() -> None:
    m = Metrics()
    c = _cluster()
    m.record_request(c, 200, "-", 0.001, 0, 1)
    m.record_request(c, 200, "-", 0.001, 150, 10**6 + 1)
    fams = _families(m.render())
    req = _buckets(fams["istio_request_bytes"])
    resp = _buckets(fams["istio_response_bytes"])
    assert len(req) == len(SIZE_BUCKETS) + 1
    assert req[1.0] == 1  # the 0-byte request
    assert req[100.0] == 1
    assert req[1000.0] == 2
    assert resp[1.0] == 1
    assert resp[1000000.0] == 1
    assert resp[10000000.0] == 2
    (rsum,) = _samples(fams["istio_response_bytes"], "_sum")
    assert rsum.value == 10**6 + 2


def test_internal_counters_and_gauges() -> None:
    m = Metrics()
    m.upstream_connection_opened("reviews|v1")
    m.upstream_connection_opened("reviews|v1")
    m.upstream_retry("reviews|v2")
    m.downstream_connections(+1)
    m.downstream_connections(+1)
    m.downstream_connections(-1)
    m.config_reload("success")
    m.config_reload("rejected")
    m.on_snapshot(Snapshot(version=""), Snapshot(version="abc123"))
    fams = _families(m.render())
    (up,) = _samples(fams["meshproxy_upstream_connections"], "_total")
    assert up.labels == {"cluster": "reviews|v1"} and up.value == 2
    (retry,) = _samples(fams["meshproxy_upstream_retries"], "_total")
    assert retry.value == 1
    assert fams["meshproxy_upstream_overflows"].type == "counter"
    assert fams["meshproxy_outlier_ejections"].type == "counter"
    (active,) = fams["meshproxy_downstream_connections_active"].samples
    assert active.value == 1
    (info,) = fams["meshproxy_config_version_info"].samples
    assert info.labels == {"version": "abc123"} and info.value == 1
    reloads = {s.labels["result"]: s.value for s in fams["meshproxy_config_reloads"].samples}
    assert reloads == {"success": 1, "rejected": 1}


def test_label_cache_follows_cluster_objects() -> None:
    m = Metrics()
    old = _cluster("v1", ("v1",))
    m.record_request(old, 200, "-", 0.001, 0, 0)
    m.on_snapshot(Snapshot(version="a"), Snapshot(version="b"))
    new = _cluster("v1", ("v2",))  # same name, different endpoints after a reload
    m.record_request(new, 200, "-", 0.001, 0, 0)
    versions = sorted(
        s.labels["destination_version"]
        for s in _samples(_families(m.render())["istio_requests"], "_total")
    )
    assert versions == ["v1", "v2"]


def test_label_values_are_escaped() -> None:
    m = Metrics(ProxyIdentity(labels={"app": 'we"ird\\app'}))
    m.record_request(None, 503, "UH", 0.001, 0, 0)
    (s,) = _samples(_families(m.render())["istio_requests"], "_total")
    assert s.labels["source_app"] == 'we"ird\\app'


def test_merge_sums_workers() -> None:
    a, b = Metrics(), Metrics()
    c = _cluster()
    a.record_request(c, 200, "-", 0.002, 5, 5)
    b.record_request(_cluster(), 200, "-", 0.02, 5, 5)  # equal labels, another object
    b.record_request(c, 503, "UF", 0.002, 0, 0)
    a.upstream_connection_opened("x")
    b.upstream_connection_opened("x")
    a.downstream_connections(2)
    b.downstream_connections(3)
    a.on_snapshot(Snapshot(version=""), Snapshot(version="v9"))
    b.on_snapshot(Snapshot(version=""), Snapshot(version="v9"))
    fams = _families(render(merge_exports([a.export(), b.export()])))
    by_code = {
        s.labels["response_code"]: s.value for s in _samples(fams["istio_requests"], "_total")
    }
    assert by_code == {"200": 2, "503": 1}
    dur = fams["istio_request_duration_milliseconds"]
    b200 = {
        float(s.labels["le"]): s.value
        for s in _samples(dur, "_bucket")
        if s.labels["response_code"] == "200"
    }
    assert b200[5.0] == 1 and b200[25.0] == 2
    (up,) = _samples(fams["meshproxy_upstream_connections"], "_total")
    assert up.value == 2
    assert fams["meshproxy_downstream_connections_active"].samples[0].value == 5
    assert len(fams["meshproxy_config_version_info"].samples) == 1


def test_empty_render_parses() -> None:
    fams = _families(Metrics().render())
    assert fams["istio_requests"].samples == []
    assert "istio_request_bytes" in fams


# --------------------------------------------------------------------------- GC


def _gc_values(fams: dict, family: str) -> dict[str, float]:
    suffix = "_total" if family.endswith("_total") else ""
    fam = fams[family.removesuffix("_total")]
    return {s.labels["generation"]: s.value for s in _samples(fam, suffix)}


def test_gc_collections_counted_only_while_installed() -> None:
    m = Metrics()
    gc.collect(0)
    assert m.gc.collections == [0, 0, 0]
    m.gc.install()
    m.gc.install()  # idempotent: one hook, one count per collection
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        m.gc.uninstall()
    assert m.gc not in gc.callbacks
    gc.collect(1)
    assert m.gc.collections == [1, 0, 1]
    assert m.gc.longest[2] > 0 and m.gc.seconds[2] >= m.gc.longest[2]
    fams = _families(m.render())
    assert _gc_values(fams, "meshproxy_gc_collections_total") == {"0": 1, "1": 0, "2": 1}
    assert _gc_values(fams, "meshproxy_gc_longest_pause_seconds")["2"] == m.gc.longest[2]
    assert _gc_values(fams, "meshproxy_gc_pause_seconds_total")["1"] == 0


def test_gc_merge_sums_counts_and_keeps_longest() -> None:
    a, b = Metrics(), Metrics()
    a.gc("start", {"generation": 1})
    a.gc("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    b.gc.collections[1] = 2
    b.gc.seconds[1] = 0.5
    b.gc.longest[1] = 0.4
    fams = _families(render(merge_exports([a.export(), b.export()])))
    assert _gc_values(fams, "meshproxy_gc_collections_total") == {"0": 0, "1": 3, "2": 0}
    assert _gc_values(fams, "meshproxy_gc_longest_pause_seconds")["1"] == 0.4
    assert _gc_values(fams, "meshproxy_gc_pause_seconds_total")["1"] >= 0.5
    # an export without the gc part merges as zeros
    old = a.export()
    del old["gc"]
    fams = _families(render(merge_exports([old])))
    assert _gc_values(fams, "meshproxy_gc_collections_total") == {"0": 0, "1": 0, "2": 0}
