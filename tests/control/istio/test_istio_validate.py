# ruff: noqa: E501 - the expected problem lines are compared verbatim
"""Validation: each fixture in tests/data/istio-invalid breaks one family of Istio's rules and must
produce exactly these lines (``FILE: Kind/name: field.path: message``), all of them, not just
the first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from control.istio import validate_paths
from control.istio.load import load_documents
from control.istio.validate import ValidationReport, compile_re2

DATA = Path(__file__).resolve().parents[2] / "data" / "istio-invalid"


@pytest.fixture(autouse=True)
def _relative_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)  # problem lines then name the file as given: "vs.yaml: ..."


def lines(name: str) -> tuple[list[str], list[str]]:
    r = validate_paths([name])
    return r.problems, r.warnings


def test_weights() -> None:
    problems, _ = lines("vs-weights.yaml")
    assert problems == [
        "vs-weights.yaml: VirtualService/reviews: spec.http[0].route[1].weight: must be >= 0",
        "vs-weights.yaml: VirtualService/reviews: spec.http[1].route: total destination weight = 0 (must be > 0)",
    ]


def test_unknown_fields_and_types() -> None:
    problems, _ = lines("vs-unknown-fields.yaml")
    assert problems == [
        "vs-unknown-fields.yaml: VirtualService/typos: spec.host: unknown field",
        "vs-unknown-fields.yaml: VirtualService/typos: spec.http[0].match[0].uri.prefixx: unknown field",
        "vs-unknown-fields.yaml: VirtualService/typos: spec.http[0].route[0].destination.subnet: unknown field",
        "vs-unknown-fields.yaml: VirtualService/typos: spec.http[0].retries.attempts: must be an integer, not a string",
    ]


def test_route_actions() -> None:
    problems, warnings = lines("vs-actions.yaml")
    p = "vs-actions.yaml: VirtualService/actions: "
    assert problems == [
        p + "spec.http[0]: HTTP route, redirect or directResponse is required",
        p + "spec.http[1]: HTTP route rule cannot contain both rewrite and redirect",
        p + "spec.http[2]: HTTP route cannot contain both route and directResponse",
        p + "spec.http[3].redirect.redirectCode: 200 is not a valid redirect code, must be 3xx",
        p + "spec.http[4].directResponse.status: HTTP status 700 is not in range 200-599",
    ]
    assert (
        p + "spec.http[3]: virtualService rule #3 not used (only the last rule can have no matches)"
        in warnings
    )


def test_values_regex_durations_ports_percentages() -> None:
    problems, _ = lines("vs-values.yaml")
    p = "vs-values.yaml: VirtualService/values: "
    assert problems == [
        p
        + "spec.http[0].fault.delay.fixedDelay: invalid duration '1x' (expected e.g. '10s', '500ms', '1h2m')",
        p
        + "spec.hosts[1]: wildcard host * is not allowed for virtual services bound to the mesh gateway",
        p
        + "spec.http[0].match[0].uri.regex: invalid regex '/api/(?=v1)': look-around and atomic groups "
        "are not supported by RE2; Istio uses RE2 style regex-based match",
        p + "spec.http[0].match[0].port: port number 70000 must be in the range 1..65535",
        p
        + "spec.http[0].match[1].headers.x-bad.regex: invalid regex 'a(b': missing ), unterminated "
        "subpattern at position 1; Istio uses RE2 style regex-based match",
        p
        + "spec.http[0].fault.abort.percentage.value: percentage 150 is neither 0.0, nor in range [0.0001, 100.0]",
        p + "spec.http[0].fault.abort.httpStatus: HTTP status 99 is not in range 200-599",
        p
        + "spec.http[0].mirrorPercentage.value: mirror_percentage must have a min value of 0 (it has -1)",
        p + "spec.http[0].retries.perTryTimeout: only durations to ms precision are supported",
        p + "spec.http[0].retries.retryOn: 'bogus' is not a valid retryOn policy",
        p
        + "spec.http[0].route[0].destination.port.number: port number 0 must be in the range 1..65535",
        p + "spec.http[0].timeout: duration must be greater than 1ms",
    ]


def test_destination_rule_subsets_and_policy() -> None:
    problems, _ = lines("dr-subsets.yaml")
    p = "dr-subsets.yaml: DestinationRule/reviews: "
    assert problems == [
        p
        + "spec.subsets[1].trafficPolicy.loadBalancer.simple: invalid value 'FASTEST', must be one of "
        "UNSPECIFIED, LEAST_CONN, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST",
        p + "spec.trafficPolicy: traffic policy must have at least one field",
        p + "spec.subsets[1].name: duplicate subset names: v1",
        p
        + "spec.subsets[1].trafficPolicy.outlierDetection.interval: duration must be greater than 1ms",
        p
        + "spec.subsets[1].trafficPolicy.outlierDetection.maxEjectionPercent: percentage 120 is not in range 0..100",
        p + "spec.subsets[2].name: subset name is invalid: Bad_Name",
    ]


def test_subset_reference_error_with_dr_warning_without() -> None:
    problems, warnings = lines("vs-subset-ref.yaml")
    assert problems == [
        "vs-subset-ref.yaml: VirtualService/reviews: spec.http[0].route[0].destination.subset: subset 'v3' "
        "is not defined by DestinationRule/reviews for host reviews.default.svc.cluster.local"
    ]
    assert warnings == [
        "vs-subset-ref.yaml: VirtualService/reviews: spec.http[0].mirror.subset: subset 'v1' of host "
        "ratings.default.svc.cluster.local: no DestinationRule for this host is loaded (the route will "
        "get no endpoints)"
    ]


def test_service_entries() -> None:
    problems, _ = lines("se-static.yaml")
    a = "se-static.yaml: ServiceEntry/static-no-endpoints: "
    b = "se-static.yaml: ServiceEntry/bad-endpoints: "
    assert problems == [
        a
        + "spec.endpoints: endpoints or a workloadSelector must be provided for resolution type STATIC",
        b
        + "spec.hosts[1]: domain name 'bad_host!.example.com' invalid (label 'bad_host!' invalid)",
        b + "spec.ports[1].name: service entry port name 'http' already defined",
        b + "spec.ports[1].number: service entry port 80 already defined",
        b + "spec.ports[1].protocol: unsupported protocol: SMTP",
        b + "spec.endpoints[0].address: endpoint address 'not-an-ip' is not a valid IP address",
        b + "spec.endpoints[0].ports.grpc: endpoint port 9000 is not defined by the service entry",
        b + "spec.ports: multiple hosts provided with non-HTTP, non-TLS ports",
    ]


def test_yaml_syntax_error_names_file_and_line() -> None:
    problems, _ = lines("broken.yaml")
    assert problems == [
        "broken.yaml: line 7, column 7: invalid YAML: while parsing a flow sequence; "
        "did not find expected ',' or ']'"
    ]


def test_the_whole_directory_reports_every_file() -> None:
    r = validate_paths(["."])
    files = {line.split(":", 1)[0] for line in r.problems}
    assert files == {
        os.path.join(".", f)
        for f in (
            "broken.yaml",
            "dr-subsets.yaml",
            "se-static.yaml",
            "vs-actions.yaml",
            "vs-subset-ref.yaml",
            "vs-unknown-fields.yaml",
            "vs-values.yaml",
            "vs-weights.yaml",
        )
    }


def _check(doc: dict) -> list[str]:
    report = ValidationReport()
    load_documents("t.yaml", [doc], report)
    return report.problems


def _vs(spec: dict, **meta: str) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "t", **meta},
        "spec": spec,
    }


ROUTE = [{"destination": {"host": "a"}}]


@pytest.mark.parametrize(
    ("http", "expected"),
    [
        (
            {"route": ROUTE, "retries": {"perTryTimeout": "2s"}},
            "spec.http[0].retries: http retry policy configured when attempts are set to 0 (disabled)",
        ),
        (
            {"route": ROUTE, "retries": {"attempts": -1}},
            "spec.http[0].retries.attempts: attempts cannot be negative",
        ),
        (
            {"redirect": {}},
            "spec.http[0].redirect: redirect must specify URI, authority, scheme, or port",
        ),
        (
            {
                "route": ROUTE,
                "rewrite": {"uri": "/a", "uriRegexRewrite": {"match": "^/b", "rewrite": "/c"}},
            },
            "spec.http[0].rewrite: rewrite may only contain one of URI or UriRegexRewrite",
        ),
        (
            {"route": ROUTE, "fault": {}},
            "spec.http[0].fault: HTTP fault injection must have an abort and/or a delay",
        ),
        (
            {"route": ROUTE, "mirror": {"host": "b"}, "mirrorPercent": 120},
            "spec.http[0].mirrorPercent: mirror_percent must have a value in 0..100 (it has 120)",
        ),
        (
            {"route": ROUTE, "headers": {"request": {"remove": ["Host"]}}},
            'spec.http[0].headers.request.remove[0]: invalid header "Host": cannot set Host header',
        ),
        (
            {"match": [{"headers": {"bad header": {"exact": "x"}}}], "route": ROUTE},
            "spec.http[0].match[0].headers.bad header: header name bad header is not a valid header name",
        ),
        (
            {"match": [{"uri": {"prefix": "/a", "exact": "/b"}}], "route": ROUTE},
            "spec.http[0].match[0].uri: only one of exact, prefix or regex may be set (got exact, prefix)",
        ),
        (
            {"route": [{"destination": {"host": "a", "subset": "v_1"}}]},
            "spec.http[0].route[0].destination.subset: subset name is invalid: v_1",
        ),
        (
            {"route": [{"destination": {"host": "*"}}]},
            "spec.http[0].route[0].destination.host: invalid destination host *",
        ),
        (
            {"route": [{"weight": 100}]},
            "spec.http[0].route[0].destination: destination is required",
        ),
    ],
)
def test_http_route_rules(http: dict, expected: str) -> None:
    assert _check(_vs({"hosts": ["a"], "http": [http]})) == [
        f"t.yaml: VirtualService/t: {expected}"
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"hosts": ["a"]}, "spec: http, tcp or tls must be provided in virtual service"),
        (
            {"hosts": ["a", "a.default.svc.cluster.local"], "http": [{"route": ROUTE}]},
            "spec.hosts[1]: duplicate hosts in virtual service: a & a.default.svc.cluster.local",
        ),
        (
            {"hosts": ["a"], "http": [{"route": ROUTE}], "exportTo": ["*", "."]},
            "spec.exportTo: cannot have both public (*) and non-public exportTo values for a resource",
        ),
        (
            {"hosts": ["bad..host"], "http": [{"route": ROUTE}]},
            "spec.hosts[0]: domain name 'bad..host' invalid (label '' invalid)",
        ),
        (
            {"hosts": ["a"], "gateways": ["ns/Bad_Gw"], "http": [{"route": ROUTE}]},
            "spec.gateways[0]: invalid value for gateway name: 'Bad_Gw'",
        ),
    ],
)
def test_virtual_service_rules(spec: dict, expected: str) -> None:
    assert _check(_vs(spec)) == [f"t.yaml: VirtualService/t: {expected}"]


def _dr(tp: dict) -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "d"},
        "spec": {"host": "a", "trafficPolicy": tp},
    }


@pytest.mark.parametrize(
    ("tp", "expected"),
    [
        (
            {"connectionPool": {}},
            "spec.trafficPolicy.connectionPool: connection pool must have at least one field",
        ),
        (
            {"connectionPool": {"tcp": {"maxConnections": -1}}},
            "spec.trafficPolicy.connectionPool.tcp.maxConnections: max connections must be non-negative",
        ),
        (
            {"loadBalancer": {"consistentHash": {"httpCookie": {"ttl": "1s"}}}},
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name: name required for HttpCookie",
        ),
        (
            {
                "loadBalancer": {
                    "consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 100}}
                }
            },
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: tableSize must be a prime number for maglev",
        ),
        (
            {"tls": {"mode": "MUTUAL", "privateKey": "k.pem"}},
            "spec.trafficPolicy.tls.clientCertificate: client certificate required for mutual tls",
        ),
        (
            {"outlierDetection": {"consecutiveLocalOriginFailures": 3}},
            "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures: outlier detection consecutive "
            "local origin failures is specified, but split external local origin errors is set to false",
        ),
        (
            {"portLevelSettings": [{"port": {"number": 80}}]},
            "spec.trafficPolicy.portLevelSettings[0]: port traffic policy must have at least one field",
        ),
        (
            {"tunnel": {"targetHost": "x.example.com", "targetPort": 0}},
            "spec.trafficPolicy.tunnel.targetPort: tunnel target port is invalid: 0",
        ),
    ],
)
def test_destination_rule_rules(tp: dict, expected: str) -> None:
    assert _check(_dr(tp)) == [f"t.yaml: DestinationRule/d: {expected}"]


def test_security_kinds_are_validated() -> None:
    pa = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "p", "namespace": "ns1"},
        "spec": {"mtls": {"mode": "STRICTER"}, "portLevelMtls": {8080: {"mode": "DISABLE"}}},
    }
    assert _check(pa) == [
        "t.yaml: PeerAuthentication/p: spec.mtls.mode: invalid value 'STRICTER', must be one of "
        "UNSET, DISABLE, PERMISSIVE, STRICT",
        "t.yaml: PeerAuthentication/p: spec.portLevelMtls: mesh/namespace peer authentication cannot "
        "have port level mTLS",
    ]
    ap = {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny"},
        "spec": {
            "action": "DENY",
            "rules": [{"from": [{"source": {}}], "to": [{"operation": {"methods": ["GET"]}}]}],
        },
    }
    assert _check(ap) == [
        "t.yaml: AuthorizationPolicy/deny: spec.rules[0].from[0].source: `from.source` must not be empty, "
        "found at rule 0"
    ]


def test_envelope_problems() -> None:
    assert _check({"apiVersion": "networking.istio.io/v2", "kind": "ServiceEntry", "metadata": {"name": "x"},
                   "spec": {"hosts": ["x.com"], "location": "MESH_INTERNAL"}}) == [
        "t.yaml: ServiceEntry/x: apiVersion: unsupported apiVersion 'networking.istio.io/v2' for ServiceEntry "
        "(expected one of networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3)"
    ]  # fmt: skip
    assert _check(_vs({"hosts": ["a"], "http": [{"route": ROUTE}]}, name="Upper")) == [
        "t.yaml: VirtualService/Upper: metadata.name: invalid name 'Upper' (must be a lower-case RFC 1123 subdomain)"
    ]
    assert _check(
        {"kind": "VirtualService", "apiVersion": "networking.istio.io/v1", "spec": {}}
    ) == [
        "t.yaml: VirtualService/<document 1>: metadata.name: required",
        "t.yaml: VirtualService/<document 1>: spec: http, tcp or tls must be provided in virtual service",
    ]
    assert _check({"metadata": {"name": "x"}}) == ["t.yaml: <no kind>/x: kind: required"]


def test_a_bad_field_does_not_echo_as_errors_on_its_defaulted_siblings() -> None:
    # port.name is not a field: the decoded port has no number, which is not the user's error
    assert _check(
        _vs(
            {
                "hosts": ["a"],
                "http": [{"route": [{"destination": {"host": "a", "port": {"name": "http"}}}]}],
            }
        )
    ) == ["t.yaml: VirtualService/t: spec.http[0].route[0].destination.port.name: unknown field"]
    # a real error elsewhere (outside the bad field's parent) is still reported
    assert _check(
        _vs(
            {
                "hosts": ["a"],
                "http": [
                    {"route": [{"destination": {"host": "a", "port": {"name": "http"}}}]},
                    {"route": [{"destination": {"host": "a", "port": {"number": 70000}}}]},
                ],
            }
        )
    ) == [
        "t.yaml: VirtualService/t: spec.http[0].route[0].destination.port.name: unknown field",
        "t.yaml: VirtualService/t: spec.http[1].route[0].destination.port.number: port number 70000 must be in the range 1..65535",
    ]


def test_compile_re2_translates_and_rejects() -> None:
    assert compile_re2(r"abc\z").fullmatch("abc")
    assert compile_re2(r"(?P<v>v\d+)").fullmatch("v12")
    assert compile_re2(r"[\1]").fullmatch("\x01")  # inside a class \1 is an octal escape, fine
    with pytest.raises(Exception, match="back-reference"):
        compile_re2(r"(a)\1")
    with pytest.raises(Exception, match="look-around"):
        compile_re2(r"a(?!b)")
