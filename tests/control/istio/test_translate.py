"""Translation: typed resources + proxy identity -> Snapshot (pure, no sockets, no event loop)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from control.istio import build_snapshot, load_paths, translate
from meshproxy.config.model import (
    DEFAULT_RETRY,
    LbKind,
    MatchKind,
    ProxyIdentity,
    RetryPolicy,
    Snapshot,
    StringMatch,
    TlsMode,
)

REPO = Path(__file__).resolve().parents[3]
BOOKINFO = REPO / "tests" / "data" / "istio-corpus" / "bookinfo"

REVIEWS_SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: reviews
spec:
  hosts: [reviews]
  location: MESH_INTERNAL
  ports:
  - {number: 9080, name: http, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {app: reviews, version: v1}}
  - {address: 10.0.0.2, labels: {app: reviews, version: v2}, weight: 3}
  - {address: 10.0.0.3, labels: {app: reviews, version: v3}, ports: {http: 19080}}
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def snapshot(paths: list[str], proxy: ProxyIdentity | None = None) -> Snapshot:
    snap, report = build_snapshot(paths, proxy or ProxyIdentity())
    assert report.problems == []
    assert snap is not None
    return snap


def bookinfo(tmp_path: Path, vs_file: str) -> Snapshot:
    se = write(tmp_path, "reviews-se.yaml", REVIEWS_SE)
    return snapshot([str(BOOKINFO / vs_file), str(BOOKINFO / "destination-rule-all.yaml"), se])


FQDN = "reviews.default.svc.cluster.local"


def test_bookinfo_90_10(tmp_path: Path) -> None:
    snap = bookinfo(tmp_path, "virtual-service-reviews-90-10.yaml")
    assert {n for n in snap.clusters if n.startswith("reviews.")} == {
        FQDN,
        f"{FQDN}|v1",
        f"{FQDN}|v2",
        f"{FQDN}|v3",
    }
    all_eps = snap.clusters[FQDN].endpoints
    assert [(e.address, e.port, e.weight) for e in all_eps] == [
        ("10.0.0.1", 9080, 1),
        ("10.0.0.2", 9080, 3),
        ("10.0.0.3", 19080, 1),
    ]
    assert [e.key for e in snap.clusters[f"{FQDN}|v1"].endpoints] == ["10.0.0.1:9080"]
    assert [e.key for e in snap.clusters[f"{FQDN}|v2"].endpoints] == ["10.0.0.2:9080"]
    assert [e.key for e in snap.clusters[f"{FQDN}|v3"].endpoints] == ["10.0.0.3:19080"]
    c = snap.clusters[f"{FQDN}|v2"]
    assert (c.host, c.port, c.subset, c.service_name, c.service_namespace) == (
        FQDN,
        9080,
        "v2",
        "reviews",
        "default",
    )
    assert c.meta is not None and c.meta.kind == "ServiceEntry"
    assert c.policy_meta is not None and c.policy_meta.ref == "DestinationRule/default/reviews"
    vh = snap.routes.exact["reviews"]
    assert vh.meta.ref == "VirtualService/default/reviews" and vh.domains == (FQDN,)
    (route,) = vh.routes
    assert route.matches == ()
    assert [(w.cluster, w.weight, w.subset) for w in route.clusters] == [
        (f"{FQDN}|v1", 90, "v1"),
        (f"{FQDN}|v2", 10, "v2"),
    ]
    assert route.total_weight == 100
    assert route.retries is DEFAULT_RETRY
    assert route.meta.path == "spec.http[0]" and route.meta.file.endswith(
        "virtual-service-reviews-90-10.yaml"
    )


def test_bookinfo_jason_header_rule(tmp_path: Path) -> None:
    snap = bookinfo(tmp_path, "virtual-service-reviews-jason-v2-v3.yaml")
    jason, rest = snap.routes.exact[FQDN].routes
    (m,) = jason.matches
    assert m.headers == (("end-user", StringMatch(MatchKind.EXACT, "jason")),)
    assert [w.cluster for w in jason.clusters] == [f"{FQDN}|v2"]
    assert jason.clusters[0].weight == 100 and jason.total_weight == 100
    assert rest.matches == () and [w.cluster for w in rest.clusters] == [f"{FQDN}|v3"]


def test_bookinfo_fault_injection(tmp_path: Path) -> None:
    snap = snapshot([str(BOOKINFO / "virtual-service-ratings-test-delay.yaml")])
    route = snap.routes.exact["ratings"].routes[0]
    assert route.fault is not None
    assert (route.fault.delay, route.fault.delay_fraction, route.fault.abort_status) == (
        7.0,
        1.0,
        None,
    )
    snap = snapshot([str(BOOKINFO / "virtual-service-ratings-test-abort.yaml")])
    f = snap.routes.exact["ratings"].routes[0].fault
    assert f is not None and (f.abort_status, f.abort_fraction, f.delay) == (500, 1.0, None)


def test_aliases_short_names_prefer_the_proxys_namespace(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "se.yaml",
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: r, namespace: alpha}
        spec:
          hosts: [reviews]
          ports: [{number: 80, name: http}]
          resolution: STATIC
          endpoints: [{address: 10.1.0.1}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: r, namespace: beta}
        spec:
          hosts: [reviews]
          ports: [{number: 80, name: http}]
          resolution: STATIC
          endpoints: [{address: 10.2.0.1}]
        """,
    )
    for ns, want in (
        ("beta", "reviews.beta.svc.cluster.local"),
        ("gamma", "reviews.alpha.svc.cluster.local"),
    ):
        snap = snapshot([p], ProxyIdentity(namespace=ns))
        ex = snap.routes.exact
        assert ex["reviews"].domains == (want,)
        for fq in ("reviews.alpha.svc.cluster.local", "reviews.beta.svc.cluster.local"):
            name_ns = fq.rsplit(".svc.cluster.local", 1)[0]
            assert ex[fq].domains == (fq,)
            assert ex[f"{name_ns}.svc"].domains == (fq,)
            assert ex[name_ns].domains == (fq,)
            assert ex[fq].routes[0].clusters[0].cluster == fq


def test_wildcard_hosts_and_hosts_covered_by_a_wildcard_vs(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "wild.yaml",
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext}
        spec:
          hosts: [api.example.com]
          ports: [{number: 80, name: http}]
          resolution: DNS
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: other}
        spec:
          hosts: ["*.other.org"]
          ports: [{number: 80, name: http}]
          resolution: NONE
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: wild}
        spec:
          hosts: ["*.example.com"]
          http:
          - route:
            - destination: {host: api.example.com}
        """,
    )
    snap = snapshot([p])
    assert "api.example.com" not in snap.routes.exact  # the wildcard VirtualService covers it
    assert snap.routes.wildcards[".example.com"].name == "default/wild"
    assert snap.routes.wildcards[".other.org"].name == "*.other.org"
    assert snap.routes.catch_all is None
    dns = snap.clusters["api.example.com"]
    assert [e.key for e in dns.endpoints] == ["api.example.com:80"]  # DNS without endpoints


def test_multi_port_service(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "mp.yaml",
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: mp, namespace: shop}
        spec:
          hosts: [cart]
          ports:
          - {number: 80, name: http, targetPort: 8080}
          - {number: 9090, name: admin}
          resolution: STATIC
          endpoints:
          - {address: 10.0.0.7, ports: {admin: 19090}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: cart, namespace: shop}
        spec:
          hosts: [cart]
          http:
          - match: [{uri: {prefix: /admin}}]
            route:
            - destination: {host: cart, port: {number: 9090}}
          - route:
            - destination: {host: cart}
        """,
    )
    snap = snapshot([p], ProxyIdentity(namespace="shop"))
    h = "cart.shop.svc.cluster.local"
    assert [e.key for e in snap.clusters[f"{h}:80"].endpoints] == ["10.0.0.7:8080"]
    assert [e.key for e in snap.clusters[f"{h}:9090"].endpoints] == ["10.0.0.7:19090"]
    admin, default = snap.routes.exact["cart"].routes
    assert admin.clusters[0].cluster == f"{h}:9090" and admin.clusters[0].by_port == {}
    assert default.clusters[0].cluster == f"{h}:80"
    assert default.clusters[0].by_port == {80: f"{h}:80", 9090: f"{h}:9090"}


POLICY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay}
spec:
  hosts: [pay.internal]
  ports: [{number: 80, name: http}, {number: 443, name: https, protocol: HTTPS}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay}
spec:
  host: pay.internal
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 5, maxRetries: 0, idleTimeout: 30s}
    outlierDetection:
      {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50}
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, sni: pay.internal}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpHeaderName: X-User
          ringHash: {minimumRingSize: 2048}
"""


def test_traffic_policy_merge(tmp_path: Path) -> None:
    snap = snapshot([write(tmp_path, "policy.yaml", POLICY)])
    top = snap.clusters["pay.internal:80"]
    assert top.lb.kind is LbKind.ROUND_ROBIN
    assert (top.pool.max_connections, top.pool.connect_timeout) == (10, 0.25)
    assert (top.pool.max_pending_requests, top.pool.max_retries, top.pool.idle_timeout) == (
        5,
        2**32 - 1,
        30.0,
    )
    assert top.outlier is not None
    assert (top.outlier.consecutive_5xx, top.outlier.interval, top.outlier.base_ejection_time) == (
        3,
        5.0,
        60.0,
    )
    assert top.outlier.max_ejection_percent == 50 and top.tls is None
    # the subset overrides only the group it sets (loadBalancer); the rest comes from the DR
    v2 = snap.clusters["pay.internal:80|v2"]
    assert v2.lb.kind is LbKind.CONSISTENT_HASH and v2.lb.hash is not None
    assert (v2.lb.hash.header, v2.lb.hash.ring_size) == ("x-user", 2048)
    assert v2.pool == top.pool and v2.outlier == top.outlier
    assert [e.address for e in v2.endpoints] == ["10.0.0.2"]
    assert v2.policy_meta is not None and v2.policy_meta.path == "spec.subsets[1].trafficPolicy"
    v1 = snap.clusters["pay.internal:80|v1"]
    assert v1.lb.kind is LbKind.ROUND_ROBIN and v1.policy_meta is not None
    assert v1.policy_meta.path == "spec.trafficPolicy"
    # port-level settings replace the top-level groups wholesale (Istio: not inherited)
    tls = snap.clusters["pay.internal:443"]
    assert tls.tls is not None and (tls.tls.mode, tls.tls.sni) == (TlsMode.SIMPLE, "pay.internal")
    assert (
        tls.lb.kind is LbKind.LEAST_REQUEST
        and tls.outlier is None
        and tls.pool.max_connections == 2**32 - 1
    )
    assert tls.protocol == "HTTPS"
    tls_v2 = snap.clusters["pay.internal:443|v2"]
    assert tls_v2.lb.kind is LbKind.CONSISTENT_HASH and tls_v2.tls == tls.tls


def test_source_labels_and_namespace_pruning(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "src.yaml",
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: r}
        spec:
          hosts: [r]
          http:
          - match:
            - {sourceLabels: {app: frontend}, headers: {x-a: {exact: "1"}}}
            - {sourceNamespace: ops}
            route: [{destination: {host: r, subset: canary}}]
          - match: [{gateways: [some-gw], uri: {prefix: /}}]
            route: [{destination: {host: r}}]
          - route: [{destination: {host: r}}]
        """,
    )
    fe = snapshot([p], ProxyIdentity(namespace="default", labels={"app": "frontend", "v": "1"}))
    canary, last = fe.routes.exact["r"].routes
    assert len(canary.matches) == 1 and canary.matches[0].headers[0][0] == "x-a"
    assert canary.meta.path == "spec.http[0]" and last.meta.path == "spec.http[2]"
    ops = snapshot([p], ProxyIdentity(namespace="ops"))
    canary, last = ops.routes.exact["r.default"].routes
    assert canary.matches[0].headers == () and last.matches == ()
    other = snapshot([p], ProxyIdentity(namespace="default", labels={"app": "backend"}))
    (only,) = other.routes.exact["r"].routes
    assert only.meta.path == "spec.http[2]"


def test_version_is_a_content_hash_stable_across_processes(tmp_path: Path) -> None:
    a = bookinfo(tmp_path, "virtual-service-reviews-90-10.yaml")
    b = bookinfo(tmp_path, "virtual-service-reviews-90-10.yaml")
    assert a.version == b.version and re.fullmatch(r"[0-9a-f]{16}", a.version)
    c = bookinfo(tmp_path, "virtual-service-reviews-80-20.yaml")
    assert c.version != a.version
    assert (
        translate(load_paths([str(BOOKINFO)]).resources, ProxyIdentity(), version="v7").version
        == "v7"
    )
    code = (
        "from control.istio import build_snapshot;from meshproxy.config.model import ProxyIdentity;"
        f"print(build_snapshot([{str(BOOKINFO / 'virtual-service-reviews-90-10.yaml')!r}, "
        f"{str(BOOKINFO / 'destination-rule-all.yaml')!r}, {str(tmp_path / 'reviews-se.yaml')!r}], "
        "ProxyIdentity())[0].version)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == a.version
    # formatting and comments do not change the content
    se = tmp_path / "reviews-se.yaml"
    se.write_text(
        "# a comment\n" + se.read_text().replace("hosts: [reviews]", "hosts:\n  - reviews")
    )
    assert bookinfo_version(tmp_path) == a.version


def bookinfo_version(tmp_path: Path) -> str:
    return snapshot(
        [
            str(BOOKINFO / "virtual-service-reviews-90-10.yaml"),
            str(BOOKINFO / "destination-rule-all.yaml"),
            str(tmp_path / "reviews-se.yaml"),
        ]
    ).version


ACTIONS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: act}
spec:
  hosts: [act.example.com]
  http:
  - name: regex-rewrite
    match:
    - uri: {regex: "/v(\\\\d+)/.*"}
      ignoreUriCase: true
      queryParams: {debug: {exact: ""}, mode: {regex: "a|b"}}
      withoutHeaders: {X-Skip: {}}
      method: {exact: GET}
      port: 8080
    rewrite:
      uriRegexRewrite: {match: "^/v(\\\\d+)/(.*)$", rewrite: "/api/\\\\2?version=\\\\1"}
      authority: internal.example.com
    headers:
      request: {set: {X-Env: prod}, add: {X-Trace: "1"}, remove: [X-Debug]}
      response: {remove: [Server]}
    timeout: 2.5s
    retries:
      {attempts: 4, perTryTimeout: 500ms, retryOn: "5xx,503,connect-failure",
       retryRemoteLocalities: true}
    mirror: {host: shadow.example.com}
    mirrorPercentage: {value: 12.5}
    route:
    - destination: {host: act.example.com}
      weight: 70
      headers: {response: {set: {X-Backend: a}}}
    - destination: {host: act.example.com}
      weight: 30
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, derivePort: FROM_REQUEST_PORT}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {bytes: "aGVsbG8="}}
  - match: [{uri: {exact: /noretry}}]
    retries: {attempts: 0}
    fault:
      delay: {fixedDelay: 1s, percent: 20}
      abort: {httpStatus: 503}
    mirrors:
    - destination: {host: shadow.example.com}
    - destination: {host: shadow.example.com}
      percentage: {value: 5}
    route: [{destination: {host: act.example.com}}]
"""


def test_route_actions(tmp_path: Path) -> None:
    snap, report = build_snapshot([write(tmp_path, "act.yaml", ACTIONS)], ProxyIdentity())
    assert report.problems == [] and snap is not None
    r0, r1, r2, r3 = snap.routes.exact["act.example.com"].routes
    assert r0.name == "regex-rewrite"
    (m,) = r0.matches
    assert m.uri is not None and m.uri.kind is MatchKind.REGEX and m.uri.ignore_case
    assert m.uri.regex is not None and m.uri.regex.fullmatch("/V2/x")
    assert m.query_params[0] == ("debug", StringMatch(MatchKind.PRESENT))
    assert m.query_params[1][1].regex is not None and m.query_params[1][1].regex.fullmatch("b")
    assert m.without_headers == (("x-skip", StringMatch(MatchKind.PRESENT)),)
    assert m.method == StringMatch(MatchKind.EXACT, "GET") and m.port == 8080
    rw = r0.rewrite
    assert rw is not None and rw.authority == "internal.example.com"
    assert rw.uri_regex is not None and rw.uri_regex_sub is not None
    assert rw.uri_regex.sub(rw.uri_regex_sub, "/v3/items/7") == "/api/items/7?version=3"
    assert r0.headers.request.set == (("x-env", "prod"),) and r0.headers.request.add == (
        ("x-trace", "1"),
    )
    assert r0.headers.request.remove == ("x-debug",) and r0.headers.response.remove == ("server",)
    assert r0.clusters[0].headers.response.set == (("x-backend", "a"),)
    assert [w.weight for w in r0.clusters] == [70, 30] and r0.total_weight == 100
    assert r0.timeout == 2.5
    assert r0.retries == RetryPolicy(
        attempts=4,
        per_try_timeout=0.5,
        retry_on=frozenset({"5xx", "connect-failure", "retriable-status-codes"}),
        retriable_status_codes=frozenset({503}),
        retry_remote_localities=True,
    )
    (mirror,) = r0.mirrors
    assert (mirror.cluster, mirror.fraction) == ("shadow.example.com", 0.125)
    assert r1.redirect is not None and (r1.redirect.uri, r1.redirect.code) == ("/new", 301)
    assert r1.redirect.derive_port == "FROM_REQUEST_PORT" and r1.clusters == ()
    assert r2.direct_response is not None and (
        r2.direct_response.status,
        r2.direct_response.body,
    ) == (418, b"hello")
    assert r3.retries == RetryPolicy(attempts=0)
    assert r3.fault is not None
    assert (
        r3.fault.delay,
        r3.fault.delay_fraction,
        r3.fault.abort_status,
        r3.fault.abort_fraction,
    ) == (1.0, 0.2, 503, 0.0)
    assert [m.fraction for m in r3.mirrors] == [1.0, 0.05]
    # destinations outside the registry still get a cluster, with no endpoints, and a warning
    assert snap.clusters["shadow.example.com"].endpoints == ()
    assert any(
        "host shadow.example.com is not defined by any ServiceEntry" in w for w in report.warnings
    )


def test_registry_resolutions_and_workload_entries(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "reg.yaml",
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: vm, namespace: vms}
        spec:
          hosts: [db.vms.svc.cluster.local]
          ports: [{number: 5432, name: tcp-pg, protocol: TCP, targetPort: 15432}]
          resolution: STATIC
          workloadSelector: {labels: {app: db}}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: db-1, namespace: vms}
        spec: {address: 10.9.0.1, labels: {app: db}, locality: r1/z1, serviceAccount: db, weight: 2}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: db-2, namespace: vms}
        spec: {address: 10.9.0.2, labels: {app: db}, ports: {tcp-pg: 6000}}
        ---
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: other, namespace: elsewhere}
        spec: {address: 10.9.0.3, labels: {app: db}}
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: pass}
        spec:
          hosts: [passthrough.example.com]
          ports: [{number: 80, name: http}]
          resolution: NONE
        """,
    )
    snap = snapshot([p])
    db = snap.clusters["db.vms.svc.cluster.local"]
    assert [(e.key, e.weight, e.locality, e.service_account) for e in db.endpoints] == [
        ("10.9.0.1:15432", 2, "r1/z1", "db"),
        ("10.9.0.2:6000", 1, "", ""),
    ]
    assert db.endpoints[0].meta is not None and db.endpoints[0].meta.ref == "WorkloadEntry/vms/db-1"
    assert db.protocol == "TCP" and db.service_name == "db" and db.service_namespace == "vms"
    pt = snap.clusters["passthrough.example.com"]
    assert pt.endpoints == () and pt.lb.kind is LbKind.PASSTHROUGH
    # a ServiceEntry host without a VirtualService gets one catch-all route, meta = the ServiceEntry
    vh = snap.routes.exact["passthrough.example.com"]
    assert vh.meta.ref == "ServiceEntry/default/pass"
    assert (
        vh.routes[0].clusters[0].cluster == "passthrough.example.com" and vh.routes[0].matches == ()
    )


def test_visibility_gateways_and_conflicts(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "vis.yaml",
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: s}
        spec:
          hosts: [s.example.com]
          ports: [{number: 80, name: http}]
          resolution: STATIC
          endpoints: [{address: 10.0.0.1}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: gw-only}
        spec:
          hosts: [s.example.com]
          gateways: [my-gw]
          http: [{directResponse: {status: 500}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: private, namespace: team}
        spec:
          hosts: [s.example.com]
          exportTo: ["."]
          http: [{directResponse: {status: 201}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: first}
        spec:
          hosts: [s.example.com]
          http: [{directResponse: {status: 202}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: second}
        spec:
          hosts: [s.example.com]
          http: [{directResponse: {status: 203}}]
        """,
    )
    status = lambda snap: snap.routes.exact["s.example.com"].routes[0].direct_response.status  # noqa: E731
    assert status(snapshot([p], ProxyIdentity(namespace="team"))) == 201
    snap = snapshot([p], ProxyIdentity(namespace="default"))
    assert status(snap) == 202
    assert any(
        "VirtualService/second: spec.hosts[0]: host s.example.com is already routed by " in w
        for w in snap.warnings
    )


def test_translate_is_pure_and_leaves_no_raw_dicts(tmp_path: Path) -> None:
    res = load_paths([str(BOOKINFO)]).resources
    a = translate(res, ProxyIdentity())
    b = translate(res, ProxyIdentity())
    assert a == b


@pytest.mark.parametrize("hosts,rules", [(10_000, 5)])
def test_translation_scales(hosts: int, rules: int) -> None:
    import time

    from control.istio.load import load_documents
    from control.istio.resources import Resources
    from control.istio.validate import ValidationReport

    docs = []
    for i in range(hosts):
        h = f"svc{i}"
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {"name": h, "namespace": f"ns{i % 50}"},
                "spec": {
                    "hosts": [h],
                    "ports": [{"number": 80, "name": "http"}],
                    "resolution": "STATIC",
                    "endpoints": [
                        {
                            "address": f"10.{i // 250 % 250}.{i % 250}.1",
                            "labels": {"version": "v1"},
                        },
                        {
                            "address": f"10.{i // 250 % 250}.{i % 250}.2",
                            "labels": {"version": "v2"},
                        },
                    ],
                },
            }
        )
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": h, "namespace": f"ns{i % 50}"},
                "spec": {
                    "host": h,
                    "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}},
                        {"name": "v2", "labels": {"version": "v2"}},
                    ],
                },
            }
        )
        http = [
            {
                "match": [
                    {"uri": {"prefix": f"/p{j}"}, "headers": {"x-user": {"regex": f"u{j}.*"}}}
                ],
                "route": [
                    {"destination": {"host": h, "subset": "v1"}, "weight": 90},
                    {"destination": {"host": h, "subset": "v2"}, "weight": 10},
                ],
                "retries": {"attempts": 3, "retryOn": "5xx"},
            }
            for j in range(rules - 1)
        ] + [{"route": [{"destination": {"host": h}}]}]
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": {"name": h, "namespace": f"ns{i % 50}"},
                "spec": {"hosts": [h], "http": http},
            }
        )
    report = ValidationReport()
    t0 = time.process_time()
    items = load_documents("generated.yaml", docs, report)
    t1 = time.process_time()
    assert report.problems == []
    resources = Resources.of(items)
    snap = translate(resources, ProxyIdentity(namespace="ns0"))
    t2 = time.process_time()
    routes = sum(len(vh.routes) for vh in {id(v): v for v in snap.routes.exact.values()}.values())
    print(
        f"\n{hosts} hosts / {routes} routes: "
        f"decode+validate {t1 - t0:.2f}s CPU, translate {t2 - t1:.2f}s CPU"
    )
    assert routes == hosts * rules
    assert len(snap.clusters) == hosts * 3
    assert t2 - t1 < 10.0
