"""control.scope: per-proxy scoping keeps exactly what can change the proxy's snapshot.

The invariant, checked over hand-written cases, real Istio YAML (tests/data/istio-corpus, the
bookinfo authorization task), a synthetic multi-namespace mesh (tests/data/scope/mesh.yaml) and
generated meshes: translating the scoped resources for a proxy gives the same routes, clusters
and inbound policy (what meshproxy.inbound derives for its own workload) as translating all of
them; the only difference allowed is fewer warnings.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.istio import Resources, ValidationReport, load_documents, load_paths, translate
from control.istio.load import cross_checks
from control.istio.resources import (
    AuthorizationPolicySpec,
    Destination,
    DestinationRuleSpec,
    HTTPMatchRequest,
    HTTPRoute,
    HTTPRouteDestination,
    LoadBalancerSettings,
    MutualTLS,
    Operation,
    PeerAuthenticationSpec,
    PolicyTargetReference,
    Resource,
    Rule,
    RuleTo,
    ServiceEntrySpec,
    ServicePort,
    SEWorkloadSelector,
    Subset,
    TrafficPolicy,
    VirtualServiceSpec,
    WorkloadEntrySpec,
    WorkloadSelector,
)
from control.scope import Scoper, scope_resources
from meshproxy.config.model import ProxyIdentity, Snapshot
from meshproxy.core.authz import applies_to
from meshproxy.core.peerauthn import resolve_workload, workload_policy
from meshproxy.inbound import inbound_policy

DATA = Path(__file__).resolve().parents[1] / "data"
MESH = DATA / "scope" / "mesh.yaml"
CORPUS = DATA / "istio-corpus"
AUTHZ = DATA / "security" / "bookinfo-authz.yaml"
ROOT = "istio-system"

KINDS = (
    "virtual_services",
    "destination_rules",
    "service_entries",
    "workload_entries",
    "peer_authentications",
    "authorization_policies",
)


# --------------------------------------------------------------------------- helpers


def load(*paths: Path) -> Resources:
    loaded = load_paths([str(p) for p in paths])
    assert loaded.report.problems == []
    return loaded.resources


def parse(text: str) -> Resources:
    report = ValidationReport()
    docs = list(yaml.load_all(textwrap.dedent(text), Loader=yaml.CSafeLoader))
    res = Resources.of(load_documents("t.yaml", docs, report))
    assert report.problems == []
    return res


def names(res: Resources) -> list[str]:
    return [f"{r.kind}/{r.namespace}/{r.name}" for r in res.all()]


def kept(text: str, ns: str, labels: dict[str, str] | None = None) -> list[str]:
    """The resources of ``text`` scoped for a proxy of ``ns``, after checking the invariant."""
    res = parse(text)
    return names(assert_equivalent(res, ProxyIdentity(namespace=ns, labels=labels or {})))


def inbound_view(snap: Snapshot, proxy: ProxyIdentity) -> tuple[Any, ...]:
    """What the data plane takes from ``snap.security`` for its own workload."""
    sec = snap.security
    t = sec.peer_authn
    ns, labels = proxy.namespace, proxy.labels
    return (
        resolve_workload(t, ns, labels),
        t.mesh,
        t.namespace_wide.get(ns),
        workload_policy(t, ns, labels),
        [p for p in sec.authz if applies_to(p, ns, labels, sec.root_namespace)],
        [inbound_policy(snap, proxy, port).describe() for port in (80, 9080, 15090)],
    )


def assert_equivalent(full: Resources, proxy: ProxyIdentity) -> Resources:
    """Scope ``full`` for ``proxy`` and check the invariant; returns the scoped resources."""
    scoped = scope_resources(full, proxy)
    # a subset of the very same objects, in load order
    for kind in KINDS:
        mine = getattr(scoped, kind)
        ids = {id(r) for r in mine}
        assert mine == tuple(r for r in getattr(full, kind) if id(r) in ids), kind
        assert len(ids) == len(mine)
    a = translate(full, proxy, version="v")
    b = translate(scoped, proxy, version="v")
    assert b.routes == a.routes
    assert b.clusters == a.clusters
    assert (b.version, b.proxy) == (a.version, a.proxy)
    assert inbound_view(b, proxy) == inbound_view(a, proxy)
    # scoping only removes warnings about documents the proxy does not get
    assert set(b.warnings) <= set(a.warnings)
    # the proxy re-validates what it receives (meshproxy.sources.stream): no new problem
    assert set(problems(scoped)) <= set(problems(full))
    return scoped


def problems(res: Resources) -> list[str]:
    report = ValidationReport()
    cross_checks(res, report)
    return report.problems


# --------------------------------------------------------------------------- exportTo


SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{host}]
  {export}
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 10.0.0.1, labels: {{version: v1}}}}]
"""


def se(name: str, ns: str, host: str, export: str = "") -> str:
    return SE.format(name=name, ns=ns, host=host, export=f"exportTo: {export}" if export else "")


def join(*docs: str) -> str:
    return "---\n".join(docs)


EXPORTS = join(
    se("default", "a", "d.example.com"),
    se("star", "a", "s.example.com", '["*"]'),
    se("dot", "a", "dot.example.com", '["."]'),
    se("to-b", "a", "b.example.com", "[b]"),
    se("dot-and-c", "a", "c.example.com", '[".", c]'),
    se("nowhere", "a", "n.example.com", '["~"]'),
)


@pytest.mark.parametrize(
    ("ns", "want"),
    [
        ("a", ["default", "star", "dot", "dot-and-c"]),
        ("b", ["default", "star", "to-b"]),
        ("c", ["default", "star", "dot-and-c"]),
        ("z", ["default", "star"]),
        (ROOT, ["default", "star"]),
    ],
)
def test_service_entry_export_to(ns: str, want: list[str]) -> None:
    assert kept(EXPORTS, ns) == [f"ServiceEntry/a/{n}" for n in want]


VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: a}}
spec:
  hosts: [{host}]
  {extra}
  http:
  - route:
    - destination: {{host: {host}}}
"""


def vs(name: str, host: str, extra: str = "") -> str:
    return VS.format(name=name, host=host, extra=extra)


def test_virtual_services_by_export_to_and_gateways() -> None:
    text = join(
        vs("default", "d.example.com"),
        vs("dot", "dot.example.com", 'exportTo: ["."]'),
        vs("to-b", "b.example.com", "exportTo: [b]"),
        vs("gateway-only", "g.example.com", "gateways: [istio-system/ingress]"),
        vs("mesh-and-gw", "m.example.com", "gateways: [mesh, istio-system/ingress]"),
        vs("short", "reviews"),
    )
    a = ["VirtualService/a/" + n for n in ("default", "dot", "mesh-and-gw", "short")]
    assert kept(text, "a") == a
    b = ["VirtualService/a/" + n for n in ("default", "to-b", "mesh-and-gw", "short")]
    assert kept(text, "b") == b


def test_virtual_service_whose_rules_exclude_the_proxy_still_claims_its_host() -> None:
    # the first VirtualService for the host has only a rule for app=x; for app=y it yields an
    # empty virtual host, which still wins the host over the second one
    text = join(
        vs("first", "h.example.com").replace(
            "  - route:", "  - match: [{sourceLabels: {app: x}}]\n    route:"
        ),
        vs("second", "h.example.com"),
    )
    got = kept(text, "b", {"app": "y"})
    assert got == ["VirtualService/a/first", "VirtualService/a/second"]


# --------------------------------------------------------------------------- DestinationRules

DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {ns}}}
spec:
  host: "{host}"
  {extra}
  trafficPolicy:
    loadBalancer: {{simple: {lb}}}
"""


def dr(name: str, ns: str, host: str, extra: str = "", lb: str = "RANDOM") -> str:
    return DR.format(name=name, ns=ns, host=host, extra=extra, lb=lb)


def test_destination_rules_on_the_lookup_path_only() -> None:
    # service reviews.svcns; a proxy in "client"
    text = join(
        se("reviews", "svcns", "reviews"),
        dr("client-own", "client", "reviews.svcns.svc.cluster.local"),
        dr("client-hidden", "client", "reviews.svcns.svc.cluster.local", "exportTo: [other]"),
        dr("svc", "svcns", "reviews"),
        dr("svc-private", "svcns", "reviews", 'exportTo: ["."]'),
        dr("root", ROOT, "*.local", lb="ROUND_ROBIN"),
        dr("root-private", ROOT, "*.local", 'exportTo: ["."]'),
        dr("elsewhere", "unrelated", "reviews.svcns.svc.cluster.local"),
    )
    assert [n for n in kept(text, "client") if n.startswith("Dest")] == [
        "DestinationRule/client/client-own",
        "DestinationRule/svcns/svc",
        "DestinationRule/istio-system/root",
    ]
    # a proxy of the root namespace reads the root's private rules (first step of the lookup)
    assert [n for n in kept(text, ROOT) if n.startswith("Dest")] == [
        "DestinationRule/svcns/svc",
        "DestinationRule/istio-system/root",
        "DestinationRule/istio-system/root-private",
    ]
    # the service's own namespace: its visible rules, private included
    assert [n for n in kept(text, "svcns") if n.startswith("Dest")] == [
        "DestinationRule/svcns/svc",
        "DestinationRule/svcns/svc-private",
        "DestinationRule/istio-system/root",
    ]


def test_unexported_rule_that_hides_an_exported_one_is_kept() -> None:
    # the exact-host rule of svcns is not exported to "client", yet the lookup picks it (most
    # specific) before dropping it, and so goes on to the root: the wildcard of svcns never
    # applies to "client". Dropping the hidden rule would change the cluster's policy.
    text = join(
        se("reviews", "svcns", "reviews"),
        dr("exact-for-x", "svcns", "reviews", "exportTo: [x]"),
        dr("wide", "svcns", "*.svcns.svc.cluster.local"),
        dr("root", ROOT, "*.local", lb="ROUND_ROBIN"),
    )
    full = parse(text)
    proxy = ProxyIdentity(namespace="client")
    got = names(assert_equivalent(full, proxy))
    assert "DestinationRule/svcns/exact-for-x" in got
    cluster = translate(full, proxy).clusters["reviews.svcns.svc.cluster.local"]
    assert cluster.policy_meta is not None and cluster.policy_meta.name == "root"
    without = Resources.of([r for r in full.all() if r.name != "exact-for-x"])
    assert translate(without, proxy).clusters[cluster.name].policy_meta.name == "wide"  # type: ignore[union-attr]


@pytest.mark.parametrize("ns", [ROOT, "client"])
def test_root_rule_exported_elsewhere_hides_the_root_wildcard(ns: str) -> None:
    # the root's exact rule (exported to b only) is the most specific; the lookup drops it for
    # visibility and finds nothing, so the root wildcard applies neither to a proxy of the root
    # namespace nor to one of "client"
    text = join(
        se("reviews", "svcns", "reviews"),
        dr("exact-for-b", ROOT, "reviews.svcns.svc.cluster.local", "exportTo: [b]"),
        dr("root", ROOT, "*.local", lb="ROUND_ROBIN"),
    )
    got = kept(text, ns)
    assert "DestinationRule/istio-system/exact-for-b" in got
    full = parse(text)
    name = "reviews.svcns.svc.cluster.local"
    assert translate(full, ProxyIdentity(ns)).clusters[name].policy_meta is None
    assert translate(full, ProxyIdentity("b")).clusters[name].policy_meta.name == "exact-for-b"  # type: ignore[union-attr]


def test_rules_a_sent_route_is_validated_against_are_sent_too() -> None:
    # bookinfo's subsets live in a rule exported to "." only; the root has a mesh-wide rule.
    # A proxy of "frontend" never reads bookinfo's rule, but re-validating the VirtualService
    # it receives looks its subset up from bookinfo: without the rule that check fails (the
    # root rule has no v1) and the proxy would refuse the config.
    text = join(
        se("reviews", "bookinfo", "reviews"),
        dr("reviews", "bookinfo", "reviews", 'exportTo: ["."]').replace(
            "  trafficPolicy:", "  subsets: [{name: v1, labels: {version: v1}}]\n  trafficPolicy:"
        ),
        dr("mesh", ROOT, "*.local", lb="ROUND_ROBIN"),
        vs("reviews", "reviews")
        .replace("namespace: a", "namespace: bookinfo")
        .replace("destination: {host: reviews}", "destination: {host: reviews, subset: v1}"),
    )
    full = parse(text)
    assert problems(full) == []
    got = names(assert_equivalent(full, ProxyIdentity("frontend")))
    assert "DestinationRule/bookinfo/reviews" in got
    sent = scope_resources(full, ProxyIdentity("frontend")).all()
    without = Resources.of([r for r in sent if r.ref != "DestinationRule/reviews"])
    assert any("subset 'v1' is not defined" in p for p in problems(without))


def test_namespace_with_no_rule_exported_to_the_proxy_contributes_none() -> None:
    text = join(
        se("reviews", "svcns", "reviews"),
        dr("for-x", "svcns", "reviews", "exportTo: [x]"),
        dr("for-y", "svcns", "*.svcns.svc.cluster.local", "exportTo: [y]"),
    )
    assert [n for n in kept(text, "client") if n.startswith("Dest")] == []
    assert [n for n in kept(text, "x") if n.startswith("Dest")] == [
        "DestinationRule/svcns/for-x",
        "DestinationRule/svcns/for-y",
    ]


def test_destination_namespace_of_a_host_outside_the_registry() -> None:
    # no ServiceEntry for legacy.attic: the translation gives it namespace attic, whose
    # exported rules then apply
    text = join(
        vs("legacy", "legacy").replace(
            "destination: {host: legacy}", "destination: {host: legacy.attic.svc.cluster.local}"
        ),
        dr("legacy", "attic", "legacy"),
        dr("other", "attic2", "legacy.attic.svc.cluster.local"),
    )
    assert [n for n in kept(text, "client") if n.startswith("Dest")] == [
        "DestinationRule/attic/legacy"
    ]


def test_workload_selector_rules_stay_because_they_hide_later_namespaces() -> None:
    # the client's own rule selects track=canary only; for another workload of "client" the
    # lookup still stops there (and the translation then drops it), so the root rule does not
    # apply: the selector rule must be kept for both workloads
    text = join(
        se("reviews", "svcns", "reviews"),
        dr(
            "canary",
            "client",
            "reviews.svcns.svc.cluster.local",
            'workloadSelector: {matchLabels: {track: canary}}\n  exportTo: ["."]',
        ),
        dr("root", ROOT, "*.local", lb="ROUND_ROBIN"),
    )
    for labels in ({"track": "canary"}, {"track": "stable"}):
        assert "DestinationRule/client/canary" in kept(text, "client", labels)
    full = parse(text)
    name = "reviews.svcns.svc.cluster.local"
    canary = translate(full, ProxyIdentity("client", {"track": "canary"})).clusters[name]
    stable = translate(full, ProxyIdentity("client", {"track": "stable"})).clusters[name]
    assert canary.policy_meta is not None and canary.policy_meta.name == "canary"
    assert stable.policy_meta is None


# --------------------------------------------------------------------------- WorkloadEntries

WE = """\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: {ns}}}
spec: {{address: {addr}, labels: {labels}}}
"""


def we(name: str, ns: str, addr: str, labels: str) -> str:
    return WE.format(name=name, ns=ns, addr=addr, labels=labels)


SELECTING_SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{name}]
  {export}
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: {app}}}}}
"""


def test_workload_entries_of_visible_service_entries_in_their_namespace() -> None:
    text = join(
        SELECTING_SE.format(name="reviews", ns="a", export="", app="reviews"),
        SELECTING_SE.format(name="pay", ns="p", export='exportTo: ["."]', app="pay"),
        we("r1", "a", "10.0.0.1", "{app: reviews, version: v1}"),
        we("r2", "a", "10.0.0.2", "{app: reviews, version: v2}"),
        we("other-app", "a", "10.0.0.3", "{app: details}"),
        we("other-ns", "b", "10.0.0.4", "{app: reviews}"),
        we("p1", "p", "10.0.0.5", "{app: pay}"),
    )
    assert [n for n in kept(text, "b") if n.startswith("Work")] == [
        "WorkloadEntry/a/r1",
        "WorkloadEntry/a/r2",
    ]
    assert [n for n in kept(text, "p") if n.startswith("Work")] == [
        "WorkloadEntry/a/r1",
        "WorkloadEntry/a/r2",
        "WorkloadEntry/p/p1",
    ]


# --------------------------------------------------------------------------- security

SECURITY = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: root-selector, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns-wide, namespace: a}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-only, namespace: a}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: DISABLE}
  portLevelMtls: {9080: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b-wide, namespace: b}
spec: {mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-all, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-web, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-all, namespace: a}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-db, namespace: a}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-waypoint, namespace: a}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-all, namespace: b}
spec:
  action: DENY
  rules: [{}]
"""


@pytest.mark.parametrize(
    ("ns", "labels", "want"),
    [
        (
            "a",
            {"app": "web"},
            [
                "PeerAuthentication/istio-system/mesh",
                "PeerAuthentication/a/ns-wide",
                "PeerAuthentication/a/web-only",
                "AuthorizationPolicy/istio-system/root-all",
                "AuthorizationPolicy/istio-system/root-web",
                "AuthorizationPolicy/a/a-all",
            ],
        ),
        (
            "a",
            {"app": "db"},
            [
                "PeerAuthentication/istio-system/mesh",
                "PeerAuthentication/a/ns-wide",
                "AuthorizationPolicy/istio-system/root-all",
                "AuthorizationPolicy/a/a-all",
                "AuthorizationPolicy/a/a-db",
            ],
        ),
        (
            "b",
            {"app": "web"},
            [
                "PeerAuthentication/istio-system/mesh",
                "PeerAuthentication/b/b-wide",
                "AuthorizationPolicy/istio-system/root-all",
                "AuthorizationPolicy/istio-system/root-web",
                "AuthorizationPolicy/b/b-all",
            ],
        ),
        (
            ROOT,
            {"app": "web"},
            [
                "PeerAuthentication/istio-system/mesh",
                "AuthorizationPolicy/istio-system/root-all",
                "AuthorizationPolicy/istio-system/root-web",
            ],
        ),
    ],
)
def test_security_policies_by_level_and_selector(
    ns: str, labels: dict[str, str], want: list[str]
) -> None:
    assert kept(SECURITY, ns, labels) == want


def test_selected_security_decides_the_same() -> None:
    full = parse(SECURITY)
    web = ProxyIdentity("a", {"app": "web"})
    scoped = scope_resources(full, web)
    pol = inbound_policy(translate(scoped, web), web, 9080)
    assert pol.describe() == {
        "mtls_mode": "STRICT",  # web-only's port-level mode
        "peer_authentication": ["istio-system/mesh", "a/ns-wide", "a/web-only"],
        "authorization_policies": [
            "DENY istio-system/root-all",
            "ALLOW istio-system/root-web",
            "ALLOW a/a-all",
        ],
    }


# --------------------------------------------------------------------------- real YAML


SYNTHETIC_PROXIES = [
    ProxyIdentity("frontend", {"app": "web"}),
    ProxyIdentity("reviews", {"app": "reviews", "version": "v1"}),
    ProxyIdentity("reviews", {"app": "reviews", "track": "canary"}),
    ProxyIdentity("ratings", {"app": "ratings"}),
    ProxyIdentity("payments", {"app": "payments"}),
    ProxyIdentity(ROOT, {"app": "istio-ingressgateway"}),
    ProxyIdentity("shared", {}),
    ProxyIdentity("hidden", {"app": "reviews"}),
    ProxyIdentity("nobody", {}),
]


@pytest.fixture(scope="module")
def mesh() -> Resources:
    return load(MESH)


@pytest.mark.parametrize("proxy", SYNTHETIC_PROXIES, ids=lambda p: f"{p.namespace}-{p.labels}")
def test_synthetic_mesh_translates_the_same(mesh: Resources, proxy: ProxyIdentity) -> None:
    scoped = assert_equivalent(mesh, proxy)
    assert len(scoped) < len(mesh)


def test_synthetic_mesh_scopes_as_istio_describes(mesh: Resources) -> None:
    frontend = names(scope_resources(mesh, ProxyIdentity("frontend", {"app": "web"})))
    payments = names(scope_resources(mesh, ProxyIdentity("payments", {"app": "payments"})))
    # payments exports everything to "." only
    assert not [n for n in frontend if "/payments/" in n]
    assert {
        "ServiceEntry/payments/payments",
        "WorkloadEntry/payments/payments-1",
        "DestinationRule/payments/payments",
        "VirtualService/payments/payments",
        "PeerAuthentication/payments/default",
        "AuthorizationPolicy/payments/payments-allow",
    } <= set(payments)
    # ratings: its ServiceEntry is exported to frontend, its VirtualService to "." only
    assert "ServiceEntry/ratings/ratings" in frontend
    assert "VirtualService/ratings/ratings" not in frontend
    # never: exportTo ~, a gateway-only VirtualService, root selector PeerAuthentication,
    # WorkloadEntries that only an invisible or other-namespace entry would select
    for n in (
        "ServiceEntry/hidden/hidden",
        "WorkloadEntry/hidden/stray-reviews",
        "VirtualService/frontend/gateway-only",
        "PeerAuthentication/istio-system/root-selector",
    ):
        assert n not in frontend and n not in payments
    # the frontend's own rule for api.example.com; shared's private one only for shared
    assert "DestinationRule/shared/example-api-frontend" in frontend
    assert "DestinationRule/shared/shared-private" not in frontend


@pytest.fixture(scope="module")
def corpus() -> Resources:
    return load(CORPUS, AUTHZ)


CORPUS_PROXIES = [
    ProxyIdentity("default", {"app": "productpage", "version": "v1"}),
    ProxyIdentity("default", {"app": "details"}),
    ProxyIdentity("default", {}),
    ProxyIdentity("testns", {"app": "reviews"}),
    ProxyIdentity("istio-system", {"app": "istio-ingressgateway"}),
    ProxyIdentity("bookinfo", {"version": "v2"}),
    ProxyIdentity("elsewhere", {}),
]


@pytest.mark.parametrize("proxy", CORPUS_PROXIES, ids=lambda p: f"{p.namespace}-{p.labels}")
def test_istio_corpus_translates_the_same(corpus: Resources, proxy: ProxyIdentity) -> None:
    assert_equivalent(corpus, proxy)


def test_istio_corpus_with_the_synthetic_mesh(corpus: Resources, mesh: Resources) -> None:
    both = Resources.of([*corpus.all(), *(_reorder(mesh, len(corpus)).all())])
    for proxy in SYNTHETIC_PROXIES + CORPUS_PROXIES:
        assert_equivalent(both, proxy)


def _reorder(res: Resources, start: int) -> Resources:
    from dataclasses import replace

    return Resources.of([replace(r, order=start + r.order) for r in res.all()])


# --------------------------------------------------------------------------- it drops things


def restricted_mesh(namespaces: int) -> Resources:
    """Each namespace keeps everything to itself (exportTo: ["."])."""
    docs = []
    for i in range(namespaces):
        ns = f"team-{i}"
        docs.append(
            f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc, namespace: {ns}}}
spec:
  hosts: [svc]
  exportTo: ["."]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: svc}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: svc-1, namespace: {ns}}}
spec: {{address: 10.{i}.0.1, labels: {{app: svc, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc, namespace: {ns}}}
spec:
  host: svc
  exportTo: ["."]
  subsets: [{{name: v1, labels: {{version: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc, namespace: {ns}}}
spec:
  hosts: [svc]
  exportTo: ["."]
  http: [{{route: [{{destination: {{host: svc, subset: v1}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: own, namespace: {ns}}}
spec:
  rules: [{{from: [{{source: {{namespaces: [{ns}]}}}}]}}]
"""
        )
    return parse("---\n".join(docs))


def test_namespace_restricted_mesh_sends_each_proxy_its_own_namespace_only() -> None:
    full = restricted_mesh(5)
    assert len(full) == 25
    proxy = ProxyIdentity("team-2", {"app": "svc"})
    scoped = assert_equivalent(full, proxy)
    assert names(scoped) == [
        "ServiceEntry/team-2/svc",
        "WorkloadEntry/team-2/svc-1",
        "DestinationRule/team-2/svc",
        "VirtualService/team-2/svc",
        "AuthorizationPolicy/team-2/own",
    ]
    assert names(scope_resources(full, ProxyIdentity("outsider"))) == []


def test_scoper_memoizes_per_identity() -> None:
    full = restricted_mesh(3)
    sc = Scoper(full)
    a = sc.for_proxy(ProxyIdentity("team-1", {"app": "svc"}, node_id="n1"))
    assert sc.for_proxy(ProxyIdentity("team-1", {"app": "svc"}, node_id="n2")) is a
    assert sc.for_proxy(ProxyIdentity("team-1", {})) is not a
    assert names(a) == names(scope_resources(full, ProxyIdentity("team-1", {"app": "svc"})))
    assert "3 identities" not in repr(sc) and "2 identities scoped" in repr(sc)


def test_empty_config() -> None:
    assert len(assert_equivalent(Resources(), ProxyIdentity())) == 0


# --------------------------------------------------------------------------- generated meshes

NS = ("a", "b", ROOT)
PROXY_NS = ("a", "b", "c", ROOT)
EXPORT = ((), (".",), ("*",), ("a",), ("b",), (".", "b"), ("c",), ("~",))
# few hosts, so that rules, entries and routes meet often
SE_HOSTS = ("svc1", "svc1.a.svc.cluster.local", "x.example.com")
DR_HOSTS = (
    *SE_HOSTS,
    "*.example.com",
    "*.a.svc.cluster.local",
    "*.local",
    "*",
    "gone.c.svc.cluster.local",
)
VS_HOSTS = (*SE_HOSTS, "*.example.com", "gone.c.svc.cluster.local")
DEST_HOSTS = (*SE_HOSTS, "gone.c.svc.cluster.local", "svc4")
# DestinationRule lookups have the most cases: more rules and entries than other kinds
GENERATED_KINDS = (
    *("ServiceEntry",) * 2,
    *("DestinationRule",) * 3,
    "WorkloadEntry",
    "VirtualService",
    "PeerAuthentication",
    "AuthorizationPolicy",
)
label_sets = st.dictionaries(
    st.sampled_from(("app", "version")), st.sampled_from(("x", "y", "v1")), max_size=2
)


@st.composite
def resource_specs(
    draw: st.DrawFn,
    kinds: tuple[str, ...] = GENERATED_KINDS,
    namespaces: tuple[str, ...] = NS,
    se_hosts: tuple[str, ...] = SE_HOSTS,
    dr_hosts: tuple[str, ...] = DR_HOSTS,
) -> tuple[str, str, Any]:
    kind = draw(st.sampled_from(kinds))
    ns = draw(st.sampled_from(namespaces))
    export = draw(st.sampled_from(EXPORT))
    labels = draw(label_sets)
    spec: Any
    if kind == "ServiceEntry":
        sel = draw(st.one_of(st.none(), label_sets))
        ports = (ServicePort(number=80, name="http", protocol="HTTP"),)
        if draw(st.booleans()):
            ports += (ServicePort(number=8080, name="alt", protocol="HTTP"),)
        spec = ServiceEntrySpec(
            hosts=(draw(st.sampled_from(se_hosts)),),
            ports=ports,
            resolution=draw(st.sampled_from(("STATIC", "DNS", "NONE"))),
            endpoints=(WorkloadEntrySpec(address="10.0.0.1", labels=labels),)
            if draw(st.booleans())
            else (),
            workload_selector=SEWorkloadSelector(labels=sel) if sel is not None else None,
            export_to=export,
            location=draw(st.sampled_from((None, "MESH_INTERNAL"))),
        )
    elif kind == "WorkloadEntry":
        spec = WorkloadEntrySpec(address=f"10.1.0.{draw(st.integers(1, 9))}", labels=labels)
    elif kind == "DestinationRule":
        sel = draw(st.one_of(st.none(), label_sets))
        spec = DestinationRuleSpec(
            host=draw(st.sampled_from(dr_hosts)),
            traffic_policy=draw(
                st.sampled_from(
                    (
                        None,
                        TrafficPolicy(load_balancer=LoadBalancerSettings(simple="RANDOM")),
                        TrafficPolicy(load_balancer=LoadBalancerSettings(simple="ROUND_ROBIN")),
                    )
                )
            ),
            subsets=tuple(
                Subset(name=n, labels={"version": n})
                for n in draw(st.lists(st.sampled_from(("v1", "x", "y")), max_size=2, unique=True))
            ),
            export_to=export,
            workload_selector=WorkloadSelector(match_labels=sel) if sel is not None else None,
        )
    elif kind == "VirtualService":
        matches: tuple[HTTPMatchRequest, ...] = ()
        if draw(st.booleans()):
            matches = (
                HTTPMatchRequest(
                    source_labels=draw(label_sets),
                    source_namespace=draw(st.sampled_from((None, "a", "b"))),
                ),
            )
        dests = tuple(
            HTTPRouteDestination(
                destination=Destination(
                    host=draw(st.sampled_from(DEST_HOSTS)),
                    subset=draw(st.sampled_from((None, "v1", "y"))),
                ),
                weight=50,
            )
            for _ in range(draw(st.integers(1, 2)))
        )
        spec = VirtualServiceSpec(
            hosts=(draw(st.sampled_from(VS_HOSTS)),),
            gateways=draw(st.sampled_from(((), ("mesh",), ("ns/gw",)))),
            http=(HTTPRoute(match=matches, route=dests),),
            export_to=export,
        )
    elif kind == "PeerAuthentication":
        sel = draw(st.one_of(st.none(), label_sets))
        spec = PeerAuthenticationSpec(
            selector=WorkloadSelector(match_labels=sel) if sel is not None else None,
            mtls=MutualTLS(mode=draw(st.sampled_from((None, "STRICT", "PERMISSIVE", "DISABLE")))),
            port_level_mtls={9080: MutualTLS(mode="STRICT")} if sel else {},
        )
    else:
        sel = draw(st.one_of(st.none(), label_sets))
        spec = AuthorizationPolicySpec(
            selector=WorkloadSelector(match_labels=sel) if sel is not None else None,
            target_refs=(PolicyTargetReference(kind="Service", name="x"),)
            if draw(st.integers(0, 5)) == 0
            else (),
            action=draw(st.sampled_from(("ALLOW", "DENY", "AUDIT"))),
            rules=(Rule(to=(RuleTo(operation=Operation(methods=("GET",))),)),),
        )
    return kind, ns, spec


def as_resources(specs: list[tuple[str, str, Any]]) -> Resources:
    return Resources.of(
        [
            Resource(kind=k, name=f"r{i}", namespace=ns, spec=spec, file="gen.yaml", order=i)
            for i, (k, ns, spec) in enumerate(specs)
        ]
    )


meshes = st.lists(resource_specs(), max_size=30).map(as_resources)
# the DestinationRule lookup alone: one service host, rules for it (exact, wildcards) in the
# proxy's, the service's, the root and an unrelated namespace, with every exportTo
lookups = st.lists(
    resource_specs(
        kinds=("ServiceEntry", *("DestinationRule",) * 4),
        namespaces=("a", "c", ROOT),
        se_hosts=("svc.a.svc.cluster.local", "svc"),
        dr_hosts=("svc.a.svc.cluster.local", "svc", "*.a.svc.cluster.local", "*.local", "*"),
    ),
    min_size=2,
    max_size=8,
).map(as_resources)
lookup_proxies = st.builds(ProxyIdentity, st.sampled_from(("a", "c", ROOT)), label_sets)
proxies = st.builds(ProxyIdentity, st.sampled_from(PROXY_NS), label_sets)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(full=meshes, proxy=proxies)
def test_generated_meshes_translate_the_same(full: Resources, proxy: ProxyIdentity) -> None:
    assert_equivalent(full, proxy)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(full=lookups, proxy=lookup_proxies)
def test_generated_lookups_translate_the_same(full: Resources, proxy: ProxyIdentity) -> None:
    assert_equivalent(full, proxy)


# --------------------------------------------------------------------------- scale


def big_mesh(namespaces: int = 100) -> Resources:
    """About 10 resources per namespace, a third of them exported to "." only, some to a
    neighbour; root policies and rules."""
    items: list[Resource[Any]] = []

    def add(kind: str, name: str, ns: str, spec: Any) -> None:
        items.append(Resource(kind=kind, name=name, namespace=ns, spec=spec, order=len(items)))

    port = (ServicePort(number=80, name="http", protocol="HTTP"),)
    for i in range(namespaces):
        ns = f"ns-{i}"
        export = ((".",), (), (f"ns-{(i + 1) % namespaces}",))[i % 3]
        add(
            "ServiceEntry",
            "svc",
            ns,
            ServiceEntrySpec(
                hosts=("svc",),
                ports=port,
                resolution="STATIC",
                workload_selector=SEWorkloadSelector(labels={"app": "svc"}),
                export_to=export,
            ),
        )
        for j in range(3):
            add(
                "WorkloadEntry",
                f"svc-{j}",
                ns,
                WorkloadEntrySpec(address=f"10.{i}.0.{j}", labels={"app": "svc", "v": f"v{j}"}),
            )
        add(
            "DestinationRule",
            "svc",
            ns,
            DestinationRuleSpec(
                host="svc",
                subsets=(Subset(name="v1", labels={"v": "v1"}),),
                export_to=export,
            ),
        )
        add(
            "VirtualService",
            "svc",
            ns,
            VirtualServiceSpec(
                hosts=("svc",),
                http=(
                    HTTPRoute(route=(HTTPRouteDestination(destination=Destination("svc", "v1")),)),
                ),
                export_to=export,
            ),
        )
        add("PeerAuthentication", "default", ns, PeerAuthenticationSpec())
        add(
            "PeerAuthentication",
            "svc",
            ns,
            PeerAuthenticationSpec(selector=WorkloadSelector({"app": "svc"})),
        )
        add("AuthorizationPolicy", "all", ns, AuthorizationPolicySpec())
        add(
            "AuthorizationPolicy",
            "svc",
            ns,
            AuthorizationPolicySpec(selector=WorkloadSelector({"app": "svc", "v": "v1"})),
        )
    add("PeerAuthentication", "mesh", ROOT, PeerAuthenticationSpec(mtls=MutualTLS("STRICT")))
    add("DestinationRule", "mesh", ROOT, DestinationRuleSpec(host="*.local"))
    add("AuthorizationPolicy", "deny", ROOT, AuthorizationPolicySpec(action="DENY"))
    return Resources.of(items)


def test_thousand_proxies_over_a_thousand_resources() -> None:
    full = big_mesh(100)
    assert len(full) >= 1000
    ids = [ProxyIdentity(f"ns-{i % 100}", {"app": "svc", "v": f"v{i // 100}"}) for i in range(1000)]
    assert len({(p.namespace, tuple(p.labels.items())) for p in ids}) == 1000
    t0 = time.perf_counter()
    sc = Scoper(full)
    sizes = [len(sc.for_proxy(p)) for p in ids]
    elapsed = time.perf_counter() - t0
    # ~1/3 of the mesh is exported everywhere; each proxy gets that plus its own namespace
    assert max(sizes) < len(full) / 2
    # generous bound (measured about 0.012 s): the point is no quadratic blow-up
    assert elapsed < 3.0, elapsed
    for p in ids[::97]:
        assert_equivalent(full, p)
