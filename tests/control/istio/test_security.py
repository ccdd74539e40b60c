"""control.istio.security: typed PeerAuthentication / AuthorizationPolicy -> security model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from control.istio import Resources, ValidationReport, load_documents, load_paths
from control.istio.security import SecurityTranslation, translate_security
from meshproxy.config.security import AuthzAction, MtlsMode
from meshproxy.core.authz import AuthzRequest, compile_policies, evaluate
from meshproxy.core.peerauthn import resolve_mtls

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "security" / "bookinfo-authz.yaml"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


@pytest.fixture(scope="module")
def bookinfo() -> SecurityTranslation:
    loaded = load_paths([str(FIXTURE)])
    assert loaded.report.ok, loaded.report.problems
    return translate_security(loaded.resources)


def translate(text: str) -> SecurityTranslation:
    report = ValidationReport()
    docs = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    res = Resources.of(load_documents("t.yaml", docs, report))
    assert report.ok, report.problems
    return translate_security(res)


def req(principal: str | None, method: str = "GET", path: str = "/") -> AuthzRequest:
    return AuthzRequest(principal, "10.0.0.1", 9080, method, path, host="svc")


def test_fixture_policies_and_provenance(bookinfo: SecurityTranslation) -> None:
    names = [p.name for p in bookinfo.config.authz]
    assert names == [
        "default/allow-nothing",
        "default/productpage-viewer",
        "default/details-viewer",
        "istio-system/deny-admin",
        "default/ext-authz",
        "default/jwt-required",
        "default/shadow",
    ]  # waypoint-only (targetRefs) is left out
    first = bookinfo.config.authz[0]
    assert first.meta.kind == "AuthorizationPolicy"
    assert first.meta.file == str(FIXTURE)
    assert first.rules == () and first.action is AuthzAction.ALLOW
    assert bookinfo.config.authz[-1].dry_run


def test_fixture_warnings_name_file_resource_and_field(bookinfo: SecurityTranslation) -> None:
    w = bookinfo.warnings
    prefix = f"{FIXTURE}: AuthorizationPolicy/"
    assert any(x.startswith(prefix + "waypoint-only: spec.targetRefs: ") for x in w)
    assert any(x.startswith(prefix + "ext-authz: spec.action: CUSTOM") for x in w)
    assert any(
        x.startswith(prefix + "jwt-required: spec.rules[0].from[0].source.requestPrincipals: ")
        for x in w
    )
    assert any(
        x.startswith(prefix + "jwt-required: spec.rules[1].when[0].key: unknown attribute")
        for x in w
    )
    assert any(x.startswith(prefix + "shadow: metadata.annotations.istio.io/dry-run: ") for x in w)
    assert len(w) == len(set(w)) == 5


@pytest.mark.parametrize(
    ("labels", "principal", "method", "path", "allowed", "policy"),
    [
        ({"app": "productpage"}, None, "GET", "/productpage", True, "default/productpage-viewer"),
        ({"app": "productpage"}, None, "POST", "/productpage", False, None),
        ({"app": "productpage"}, None, "GET", "/admin/x", False, "istio-system/deny-admin"),
        ({"app": "details"}, PRODUCTPAGE, "GET", "/details/0", True, "default/details-viewer"),
        ({"app": "details"}, "cluster.local/ns/default/sa/other", "GET", "/d", False, None),
        ({"app": "details"}, None, "GET", "/details/0", False, None),
        ({"app": "ratings"}, PRODUCTPAGE, "GET", "/secure/1", False, "default/ext-authz"),
        ({"app": "ratings"}, PRODUCTPAGE, "GET", "/ratings/1", False, None),  # allow-nothing
        ({"app": "reviews"}, PRODUCTPAGE, "GET", "/reviews/1", False, None),  # JWT never here
    ],
)
def test_fixture_decisions(
    bookinfo: SecurityTranslation,
    labels: dict[str, str],
    principal: str | None,
    method: str,
    path: str,
    allowed: bool,
    policy: str | None,
) -> None:
    t = compile_policies(bookinfo.config.authz, "default", labels)
    d = evaluate(t, req(principal, method, path))
    assert (d.allowed, d.policy) == (allowed, policy)


def test_fixture_mtls(bookinfo: SecurityTranslation) -> None:
    pa = bookinfo.config.peer_authn
    assert resolve_mtls(pa, "default", {"app": "details"}, 9080) is MtlsMode.STRICT
    assert resolve_mtls(pa, "default", {"app": "details"}, 15090) is MtlsMode.PERMISSIVE
    assert resolve_mtls(pa, "other", {}, 15090) is MtlsMode.STRICT


def test_peer_authn_rank_is_load_order_then_name() -> None:
    t = translate(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: z, namespace: foo}\nspec: {mtls: {mode: DISABLE}}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: a, namespace: foo}\nspec: {mtls: {mode: STRICT}}\n"
    )
    pa = t.config.peer_authn
    assert pa.namespace_wide["foo"].meta.name == "z"
    assert resolve_mtls(pa, "foo", {}, 1) is MtlsMode.DISABLE


def test_root_namespace_selector_peer_authn_warns() -> None:
    t = translate(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
        "metadata: {name: sel, namespace: istio-system}\n"
        "spec: {selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}\n"
    )
    assert t.warnings == (
        "t.yaml: PeerAuthentication/sel: spec.selector: a workload-selector policy in the "
        "root namespace istio-system applies to no workload (as in Istio); ignored",
    )
    assert resolve_mtls(t.config.peer_authn, "istio-system", {"app": "a"}, 1) is MtlsMode.PERMISSIVE


def test_custom_root_namespace() -> None:
    text = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: mesh, namespace: mesh-root}\nspec: {mtls: {mode: STRICT}}\n"
    )
    report = ValidationReport()
    res = Resources.of(
        load_documents("t.yaml", list(yaml.load_all(text, Loader=yaml.CSafeLoader)), report)
    )
    t = translate_security(res, root_namespace="mesh-root")
    assert resolve_mtls(t.config.peer_authn, "foo", {}, 1) is MtlsMode.STRICT
    assert resolve_mtls(translate_security(res).config.peer_authn, "foo", {}, 1) is (
        MtlsMode.PERMISSIVE
    )


def test_when_values_and_sources_are_carried() -> None:
    t = translate(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: foo}\n"
        "spec:\n  action: DENY\n  rules:\n"
        "  - from:\n    - source: {notNamespaces: [foo], ipBlocks: [10.0.0.0/8]}\n"
        "    to:\n    - operation: {notPaths: [/healthz], ports: ['8080']}\n"
        "    when:\n    - {key: 'request.headers[X-A]', values: [a], notValues: [b]}\n"
    )
    (p,) = t.config.authz
    (rule,) = p.rules
    assert p.action is AuthzAction.DENY and not rule.skip
    assert rule.sources[0].namespaces.not_values == ("foo",)
    assert rule.sources[0].ip_blocks.values == ("10.0.0.0/8",)
    assert rule.operations[0].paths.not_values == ("/healthz",)
    assert rule.operations[0].ports.values == ("8080",)
    assert rule.conditions[0].key == "request.headers[X-A]"
    assert rule.conditions[0].match.values == ("a",)
    assert t.warnings == ()


def test_request_auth_when_key_warns_but_keeps_rule() -> None:
    t = translate(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: foo}\n"
        "spec:\n  rules:\n  - when:\n    - {key: 'request.auth.claims[iss]', values: [x]}\n"
    )
    assert not t.config.authz[0].rules[0].skip
    assert len(t.warnings) == 1 and "request.auth.claims[iss] is not supported" in t.warnings[0]


def test_empty_resources() -> None:
    t = translate_security(Resources())
    assert t.config.authz == () and len(t.config.peer_authn) == 0 and t.warnings == ()
