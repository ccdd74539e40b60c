"""AuthorizationPolicy evaluation (pure): Istio's documented examples and edge cases.

Policies are written as Istio YAML, decoded and validated by ``control.istio`` and translated
by ``control.istio.security``, then compiled for one workload and evaluated on requests.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import yaml

from control.istio import Resources, ValidationReport, load_documents
from control.istio.security import translate_security
from meshproxy.config.model import Meta
from meshproxy.config.security import (
    AuthzAction,
    AuthzCondition,
    AuthzOperation,
    AuthzPolicy,
    AuthzRule,
    AuthzSource,
    Values,
)
from meshproxy.core.authz import (
    AuthzRequest,
    AuthzTable,
    Decision,
    compile_policies,
    evaluate,
    peer_namespace,
    request_path,
)

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
FOO_SA = "spiffe://cluster.local/ns/foo/sa/httpbin"
BAR_SA = "spiffe://cluster.local/ns/bar/sa/client"


def policies(text: str) -> tuple[AuthzPolicy, ...]:
    report = ValidationReport()
    docs = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    res = Resources.of(load_documents("t.yaml", docs, report))
    assert report.ok, report.problems
    return translate_security(res).config.authz


def table(text: str, ns: str = "foo", labels: Mapping[str, str] | None = None) -> AuthzTable:
    return compile_policies(
        policies(text), ns, labels if labels is not None else {"app": "httpbin"}
    )


def req(
    principal: str | None = SLEEP,
    method: str = "GET",
    path: str = "/",
    host: str | None = "httpbin.foo",
    port: int = 8000,
    ip: str = "10.0.0.9",
    headers: Mapping[str, str] | None = None,
    **kw: object,
) -> AuthzRequest:
    return AuthzRequest(
        principal=principal,
        source_ip=ip,
        destination_port=port,
        method=method,
        path=path,
        host=host,
        headers=headers or {},
        **kw,  # type: ignore[arg-type]
    )


def allowed(t: AuthzTable, r: AuthzRequest) -> bool:
    return evaluate(t, r).allowed


def ap(name: str, spec: str, ns: str = "foo") -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n---\n"
    )


# --------------------------------------------------------------------------- Istio's examples

DOC_HTTPBIN = ap(
    "httpbin",
    """
action: ALLOW
rules:
- from:
  - source:
      principals: ["cluster.local/ns/default/sa/sleep"]
  - source:
      namespaces: ["test"]
  to:
  - operation:
      methods: ["GET"]
      paths: ["/info*"]
  - operation:
      methods: ["POST"]
      paths: ["/data"]
""",
)


@pytest.mark.parametrize(
    ("principal", "method", "path", "ok"),
    [
        (SLEEP, "GET", "/info", True),
        (SLEEP, "GET", "/info/more?x=1", True),
        (SLEEP, "POST", "/data", True),
        (SLEEP, "POST", "/info", False),
        (SLEEP, "GET", "/data", False),
        ("spiffe://cluster.local/ns/test/sa/anyone", "POST", "/data", True),
        ("spiffe://cluster.local/ns/other/sa/sleep", "GET", "/info", False),
        (None, "GET", "/info", False),
    ],
)
def test_doc_example_allow_principal_or_namespace(
    principal: str | None, method: str, path: str, ok: bool
) -> None:
    t = table(DOC_HTTPBIN)
    assert allowed(t, req(principal, method, path)) is ok


def test_doc_example_deny_not_from_namespace_foo() -> None:
    t = table(ap("httpbin", 'action: DENY\nrules:\n- from:\n  - source: {notNamespaces: ["foo"]}'))
    assert allowed(t, req(FOO_SA))
    d = evaluate(t, req(BAR_SA))
    assert d == Decision(False, "foo/httpbin", False)
    assert not allowed(t, req(None))  # plaintext: no namespace, so "not foo"


def test_doc_example_allow_all() -> None:
    t = table(ap("allow-all", "rules:\n- {}"))
    assert evaluate(t, req(None, "DELETE", "/x")) == Decision(True, "foo/allow-all")


def test_doc_example_allow_nothing() -> None:
    t = table(ap("allow-nothing", "{}"))
    assert evaluate(t, req()) == Decision(False, None)


def test_doc_example_deny_all() -> None:
    t = table(ap("deny-all", "action: DENY\nrules:\n- {}"))
    assert evaluate(t, req()) == Decision(False, "foo/deny-all")


def test_deny_all_wins_over_allow_all() -> None:
    t = table(ap("allow-all", "rules:\n- {}") + ap("deny-all", "action: DENY\nrules:\n- {}"))
    assert evaluate(t, req()).policy == "foo/deny-all"


def test_doc_example_jwt_condition_never_matches_without_jwt() -> None:
    text = ap(
        "httpbin",
        """
rules:
- from:
  - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
  when:
  - key: request.auth.claims[iss]
    values: ["https://accounts.google.com"]
""",
    )
    assert not allowed(table(text), req())


def test_doc_example_audit_get_user_profile() -> None:
    t = table(
        ap(
            "audit",
            "action: AUDIT\nrules:\n- to:\n"
            '  - operation: {methods: ["GET"], paths: ["/user/profile/*"]}',
        )
    )
    assert evaluate(t, req(path="/user/profile/me")) == Decision(True, None, True)
    assert evaluate(t, req(path="/other")) == Decision(True, None, False)


def test_audit_does_not_change_a_deny() -> None:
    t = table(ap("audit", "action: AUDIT\nrules:\n- {}") + ap("deny", "action: DENY\nrules:\n- {}"))
    assert evaluate(t, req()) == Decision(False, "foo/deny", True)


def test_doc_example_deny_plaintext_with_not_principals_star() -> None:
    t = table(
        ap("require-mtls", 'action: DENY\nrules:\n- from:\n  - source: {notPrincipals: ["*"]}')
    )
    assert allowed(t, req(SLEEP))
    assert not allowed(t, req(None))


def test_doc_example_ip_blocks() -> None:
    t = table(
        ap(
            "ip",
            'rules:\n- from:\n  - source: {ipBlocks: ["1.2.3.4", "5.6.7.0/24", "2001:db8::/32"]}',
        )
    )
    assert allowed(t, req(ip="1.2.3.4"))
    assert allowed(t, req(ip="5.6.7.200"))
    assert allowed(t, req(ip="2001:db8::1"))
    assert not allowed(t, req(ip="1.2.3.5"))
    assert not allowed(t, req(ip="5.6.8.1"))
    assert not allowed(t, req(ip="not-an-ip"))


def test_not_ip_blocks_and_remote_ip_blocks() -> None:
    t = table(
        ap(
            "ip",
            'action: DENY\nrules:\n- from:\n  - source: {notIpBlocks: ["10.0.0.0/8"]}\n'
            '- from:\n  - source: {remoteIpBlocks: ["192.0.2.0/24"]}',
        )
    )
    assert allowed(t, req(ip="10.1.1.1"))
    assert not allowed(t, req(ip="11.1.1.1"))
    # remote ip defaults to the peer; when an original client is known it is used
    assert not allowed(t, req(ip="10.1.1.1", remote_ip="192.0.2.7"))
    assert allowed(t, req(ip="10.1.1.1", remote_ip="198.51.100.1"))


def test_doc_example_path_templates() -> None:
    t = table(
        ap(
            "tmpl",
            'rules:\n- to:\n  - operation: {paths: ["/store/{*}/inventory", "/files/{**}/meta"]}',
        )
    )
    assert allowed(t, req(path="/store/42/inventory"))
    assert not allowed(t, req(path="/store/a/b/inventory"))
    assert not allowed(t, req(path="/store//inventory"))
    assert allowed(t, req(path="/files/a/b/c/meta"))
    assert not allowed(t, req(path="/files/a/b/c/other"))


# --------------------------------------------------------------------------- value forms


@pytest.mark.parametrize(
    ("value", "principal", "ok"),
    [
        ("cluster.local/ns/default/sa/sleep", SLEEP, True),
        ("cluster.local/ns/default/sa/sleep", "cluster.local/ns/default/sa/sleep", True),
        ("cluster.local/ns/default/sa/sleep", "spiffe://cluster.local/ns/default/sa/sleepy", False),
        ("cluster.local/ns/default/*", SLEEP, True),
        ("cluster.local/ns/other/*", SLEEP, False),
        ("*/sa/sleep", SLEEP, True),
        ("*/sa/sleep", BAR_SA, False),
        ("*", SLEEP, True),
        ("*", None, False),
        ("*", "", False),
    ],
)
def test_principal_forms(value: str, principal: str | None, ok: bool) -> None:
    t = table(ap("p", f'rules:\n- from:\n  - source: {{principals: ["{value}"]}}'))
    assert allowed(t, req(principal)) is ok


def test_not_principals_match_plaintext() -> None:
    t = table(
        ap(
            "p",
            'rules:\n- from:\n  - source: {notPrincipals: ["cluster.local/ns/default/sa/sleep"]}',
        )
    )
    assert not allowed(t, req(SLEEP))
    assert allowed(t, req(BAR_SA))
    assert allowed(t, req(None))  # Istio: empty principal is "not" any listed one


@pytest.mark.parametrize(
    ("value", "principal", "ok"),
    [
        ("default", SLEEP, True),
        ("default", BAR_SA, False),
        ("def*", SLEEP, True),
        ("*ault", SLEEP, True),
        ("*", SLEEP, True),
        ("*", None, False),
        ("default", None, False),
    ],
)
def test_namespace_forms(value: str, principal: str | None, ok: bool) -> None:
    t = table(ap("n", f'rules:\n- from:\n  - source: {{namespaces: ["{value}"]}}'))
    assert allowed(t, req(principal)) is ok


def test_service_accounts_default_to_policy_namespace() -> None:
    t = table(
        ap("sa", 'rules:\n- from:\n  - source: {serviceAccounts: ["httpbin", "default/sleep"]}')
    )
    assert allowed(t, req(FOO_SA))
    assert allowed(t, req(SLEEP))
    assert not allowed(t, req("spiffe://cluster.local/ns/foo/sa/httpbin-other"))
    assert not allowed(t, req(None))


@pytest.mark.parametrize(
    ("value", "method", "ok"),
    [("GET", "GET", True), ("GET", "get", False), ("*", "PATCH", True), ("P*", "PUT", True),
     ("*ET", "GET", True), ("*ET", "PUT", False)],
)  # fmt: skip
def test_method_forms(value: str, method: str, ok: bool) -> None:
    t = table(ap("m", f'rules:\n- to:\n  - operation: {{methods: ["{value}"]}}'))
    assert allowed(t, req(method=method)) is ok


@pytest.mark.parametrize(
    ("value", "path", "ok"),
    [
        ("/exact", "/exact", True),
        ("/exact", "/exact/", False),
        ("/exact", "/exact?q=1", True),
        ("/exact", "/Exact", False),
        ("/api/*", "/api/v1", True),
        ("/api/*", "/ap", False),
        ("*.png", "/img/x.png", True),
        ("*", "/anything", True),
        ("/admin", "/public/../admin", True),
        ("/admin", "/%61dmin", True),
        ("/admin/x", "/admin%2Fx", False),
    ],
)
def test_path_forms(value: str, path: str, ok: bool) -> None:
    t = table(ap("p", f'rules:\n- to:\n  - operation: {{paths: ["{value}"]}}'))
    assert allowed(t, req(path=path)) is ok


@pytest.mark.parametrize(
    ("value", "host", "ok"),
    [
        ("httpbin.foo", "httpbin.foo", True),
        ("httpbin.foo", "HTTPBIN.Foo", True),
        ("httpbin.foo", "httpbin.foo:8000", False),  # Istio: list "httpbin.foo:*" too
        ("httpbin.foo:*", "httpbin.foo:8000", True),
        ("*.foo", "httpbin.foo", True),
        ("*.foo", "httpbin.bar", False),
        ("*", "anything", True),
        ("*", None, False),
    ],
)
def test_host_forms(value: str, host: str | None, ok: bool) -> None:
    t = table(ap("h", f'rules:\n- to:\n  - operation: {{hosts: ["{value}"]}}'))
    assert allowed(t, req(host=host)) is ok


def test_ports_and_not_ports() -> None:
    t = table(
        ap("p", 'rules:\n- to:\n  - operation: {ports: ["8000", "9000"], notPaths: ["/private*"]}')
    )
    assert allowed(t, req(port=8000))
    assert allowed(t, req(port=9000, path="/pub"))
    assert not allowed(t, req(port=8001))
    assert not allowed(t, req(port=8000, path="/private/x"))


def test_not_methods_alone() -> None:
    t = table(ap("m", 'action: DENY\nrules:\n- to:\n  - operation: {notMethods: ["GET", "HEAD"]}'))
    assert allowed(t, req(method="HEAD"))
    assert not allowed(t, req(method="POST"))


# --------------------------------------------------------------------------- when


def test_when_header_values_and_not_values() -> None:
    t = table(
        ap(
            "w",
            """
rules:
- when:
  - key: request.headers[X-Version]
    values: ["v1", "v2*"]
    notValues: ["v2-beta"]
""",
        )
    )
    assert allowed(t, req(headers={"x-version": "v1"}))
    assert allowed(t, req(headers={"x-version": "v2-rc"}))
    assert not allowed(t, req(headers={"x-version": "v2-beta"}))
    assert not allowed(t, req(headers={"x-version": "v3"}))
    assert not allowed(t, req())


def test_when_header_star_means_present() -> None:
    t = table(
        ap(
            "w",
            'action: DENY\nrules:\n- when:\n  - {key: "request.headers[x-debug]", values: ["*"]}',
        )
    )
    assert not allowed(t, req(headers={"x-debug": ""}))
    assert allowed(t, req())


def test_when_not_values_on_absent_header_match() -> None:
    t = table(
        ap(
            "w",
            "action: DENY\nrules:\n- when:\n"
            '  - {key: "request.headers[x-token]", notValues: ["secret"]}',
        )
    )
    assert not allowed(t, req())
    assert allowed(t, req(headers={"x-token": "secret"}))


def test_when_source_namespace_principal_ip_port() -> None:
    text = ap(
        "w",
        """
rules:
- when:
  - {key: source.namespace, values: ["default"]}
  - {key: source.principal, values: ["cluster.local/ns/default/*"]}
  - {key: source.ip, values: ["10.0.0.0/24"]}
  - {key: destination.port, values: ["8000"]}
""",
    )
    t = table(text)
    assert allowed(t, req())
    assert not allowed(t, req(BAR_SA))
    assert not allowed(t, req(None))
    assert not allowed(t, req(ip="10.0.1.1"))
    assert not allowed(t, req(port=9000))


def test_when_destination_ip_and_sni() -> None:
    t = table(
        ap(
            "w",
            'rules:\n- when:\n  - {key: destination.ip, values: ["127.0.0.1"]}\n'
            '  - {key: connection.sni, values: ["*.foo.svc"]}',
        )
    )
    assert allowed(t, req(destination_ip="127.0.0.1", sni="httpbin.foo.svc"))
    assert not allowed(t, req(destination_ip="127.0.0.2", sni="httpbin.foo.svc"))
    assert not allowed(t, req(destination_ip="127.0.0.1"))


def test_request_auth_not_values_always_match() -> None:
    t = table(
        ap(
            "w",
            "action: DENY\nrules:\n- when:\n"
            '  - {key: "request.auth.claims[groups]", notValues: ["admin"]}',
        )
    )
    assert not allowed(t, req())  # no JWT: not in group admin


def test_request_principals_never_match_not_request_principals_always() -> None:
    allow = table(ap("jwt", 'rules:\n- from:\n  - source: {requestPrincipals: ["*"]}'))
    assert not allowed(allow, req())
    deny = table(
        ap("jwt", 'action: DENY\nrules:\n- from:\n  - source: {notRequestPrincipals: ["*"]}')
    )
    assert not allowed(deny, req())


# --------------------------------------------------------------------------- combination


def test_and_within_source_or_across_sources() -> None:
    t = table(
        ap(
            "c",
            """
rules:
- from:
  - source: {namespaces: ["default"], ipBlocks: ["10.0.0.0/24"]}
  - source: {principals: ["cluster.local/ns/bar/sa/client"]}
""",
        )
    )
    assert allowed(t, req(SLEEP, ip="10.0.0.5"))
    assert not allowed(t, req(SLEEP, ip="10.9.0.5"))
    assert allowed(t, req(BAR_SA, ip="10.9.0.5"))


def test_or_across_rules_and_policies() -> None:
    t = table(
        ap(
            "a",
            'rules:\n- to:\n  - operation: {paths: ["/a"]}\n- to:\n  - operation: {paths: ["/b"]}',
        )
        + ap("c", 'rules:\n- to:\n  - operation: {paths: ["/c"]}')
    )
    assert evaluate(t, req(path="/b")).policy == "foo/a"
    assert evaluate(t, req(path="/c")).policy == "foo/c"
    assert evaluate(t, req(path="/d")) == Decision(False, None)


def test_unknown_when_key_skips_the_rule_only() -> None:
    text = ap(
        "u",
        'rules:\n- when:\n  - {key: source.bogus, values: ["x"]}\n'
        '- to:\n  - operation: {paths: ["/ok"]}',
    )
    t = table(text)
    assert allowed(t, req(path="/ok"))
    assert not allowed(t, req(path="/other"))


def test_custom_without_provider_denies_matching_requests() -> None:
    t = table(
        ap(
            "ext",
            "action: CUSTOM\nprovider: {name: my-ext-authz}\n"
            'rules:\n- to:\n  - operation: {paths: ["/admin*"]}',
        )
    )
    assert evaluate(t, req(path="/admin/x")) == Decision(False, "foo/ext")
    assert allowed(t, req(path="/public"))


def test_no_policy_allows_everything() -> None:
    t = compile_policies((), "foo", {})
    assert t.empty
    assert evaluate(t, req(None)) == Decision(True)


# --------------------------------------------------------------------------- selection


def test_selection_by_selector_namespace_and_root() -> None:
    text = (
        ap(
            "sel",
            "selector: {matchLabels: {app: httpbin}}\n"
            "action: DENY\nrules:\n- to:\n  - operation: {paths: ['/sel']}",
        )
        + ap("ns", "action: DENY\nrules:\n- to:\n  - operation: {paths: ['/ns']}")
        + ap(
            "other-ns", "action: DENY\nrules:\n- to:\n  - operation: {paths: ['/other']}", ns="bar"
        )
        + ap(
            "mesh",
            "action: DENY\nrules:\n- to:\n  - operation: {paths: ['/mesh']}",
            ns="istio-system",
        )
        + ap(
            "root-sel",
            "selector: {matchLabels: {app: httpbin}}\n"
            "action: DENY\nrules:\n- to:\n  - operation: {paths: ['/rootsel']}",
            ns="istio-system",
        )
    )
    ps = policies(text)
    httpbin = compile_policies(ps, "foo", {"app": "httpbin", "version": "v1"})
    assert not allowed(httpbin, req(path="/sel"))
    assert not allowed(httpbin, req(path="/ns"))
    assert not allowed(httpbin, req(path="/mesh"))
    assert not allowed(httpbin, req(path="/rootsel"))  # root selector: every namespace
    assert allowed(httpbin, req(path="/other"))
    other = compile_policies(ps, "foo", {"app": "other"})
    assert allowed(other, req(path="/sel"))
    assert not allowed(other, req(path="/ns"))
    barapp = compile_policies(ps, "bar", {"app": "httpbin"})
    assert not allowed(barapp, req(path="/other"))
    assert not allowed(barapp, req(path="/rootsel"))
    assert allowed(barapp, req(path="/ns"))


def test_allow_policy_on_another_workload_does_not_deny_this_one() -> None:
    text = ap("only-reviews", "selector: {matchLabels: {app: reviews}}\nrules:\n- {}")
    assert allowed(table(text, labels={"app": "httpbin"}), req())


def test_dry_run_policy_not_enforced() -> None:
    text = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata:\n  name: dry\n  namespace: foo\n  annotations: {istio.io/dry-run: 'true'}\n"
        "spec:\n  action: DENY\n  rules:\n  - {}\n"
    )
    assert allowed(table(text), req())


def test_target_ref_policy_not_applied_to_sidecar() -> None:
    text = ap(
        "gw",
        "targetRefs:\n- {kind: Gateway, group: gateway.networking.k8s.io, name: gw}\n"
        "action: DENY\nrules:\n- {}",
    )
    assert allowed(table(text), req())


def test_model_built_directly_evaluates_the_same() -> None:
    meta = Meta("AuthorizationPolicy", "direct", "foo")
    rule = AuthzRule(
        sources=(AuthzSource(principals=Values(("cluster.local/ns/default/sa/sleep",))),),
        operations=(AuthzOperation(methods=Values(("GET",))),),
        conditions=(AuthzCondition("request.headers[x-a]", Values(("1",))),),
    )
    p = AuthzPolicy(meta, "foo", AuthzAction.ALLOW, rules=(rule,))
    t = compile_policies([p], "foo", {})
    assert allowed(t, req(headers={"x-a": "1"}))
    assert not allowed(t, req(headers={"x-a": "2"}))
    assert repr(t) == "AuthzTable(ALLOW foo/direct)"


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("/a?b=/c", "/a"),
        ("/a#frag", "/a"),
        ("/a/./b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/%7Euser/%2e%2e/x", "/x"),
        ("/x%2fy", "/x%2Fy"),
        ("*", "*"),
    ],
)
def test_request_path(raw: str, want: str) -> None:
    assert request_path(raw) == want


def test_peer_namespace() -> None:
    assert peer_namespace(SLEEP) == "default"
    assert peer_namespace("cluster.local/ns/x") == "x"
    assert peer_namespace("spiffe://td/sa/x") is None
    assert peer_namespace(None) is None
