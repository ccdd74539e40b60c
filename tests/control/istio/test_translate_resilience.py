# ruff: noqa: E501 - the expected problem lines are compared verbatim
"""Resilience translation, YAML in -> Snapshot out: DestinationRule retryBudget, outlier
detection and connection pool; VirtualService retries, timeout, fault and mirroring.

Every expectation is Istio's, and the tests that pin a "0 means unset" or default rule cite
the Istio source it comes from. Pure: files in a temp dir, no sockets, no event loop.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from control.istio import IncrementalBuilder, build_snapshot, validate_paths
from meshproxy.config.model import (
    DEFAULT_RETRY,
    Cluster,
    ConnectionPool,
    LbKind,
    OutlierPolicy,
    ProxyIdentity,
    RetryBudget,
    RetryPolicy,
    Route,
    Snapshot,
)

HOST = "pay.internal"

# two ports, so clusters are named host:port[|subset]; endpoints labelled per version
SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay}
spec:
  hosts: [pay.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 9090, name: admin, protocol: HTTP}
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: 10.0.0.3, labels: {version: v3}}
  - {address: 10.0.0.4, labels: {version: v4}}
"""

DR_HEAD = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pay}
spec:
  host: pay.internal
"""

VS_HEAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay}
spec:
  hosts: [pay.internal]
  http:
"""


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def _indent(text: str, by: int) -> str:
    return textwrap.indent(textwrap.dedent(text), " " * by)


def build(tmp_path: Path, *docs: str) -> Snapshot:
    paths = [_write(tmp_path, "se.yaml", SE)]
    paths += [_write(tmp_path, f"doc{i}.yaml", d) for i, d in enumerate(docs)]
    snap, report = build_snapshot(paths, ProxyIdentity())
    assert report.problems == []
    assert snap is not None
    return snap


def dr(spec_body: str) -> str:
    """A DestinationRule for pay.internal whose spec continues with ``spec_body``."""
    return DR_HEAD + _indent(spec_body, 2)


def policy(tp_body: str) -> str:
    """A DestinationRule whose top-level trafficPolicy is ``tp_body``."""
    return DR_HEAD + "  trafficPolicy:\n" + _indent(tp_body, 4)


def cluster(snap: Snapshot, port: int = 80, subset: str | None = None) -> Cluster:
    name = f"{HOST}:{port}" + (f"|{subset}" if subset else "")
    return snap.clusters[name]


def findings(tmp_path: Path, *docs: str) -> tuple[list[str], list[str]]:
    """Problems and warnings of ``docs`` (written as doc0.yaml, ...), with relative paths."""
    names = ["se.yaml"]
    _write(tmp_path, "se.yaml", SE)
    for i, d in enumerate(docs):
        names.append(f"doc{i}.yaml")
        _write(tmp_path, names[-1], d)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = validate_paths(names)
    finally:
        os.chdir(cwd)
    return r.problems, r.warnings


def vs(*rules: str) -> str:
    """A VirtualService for pay.internal with the given http rules (each a YAML mapping)."""
    body = "".join(_indent(r, 2) for r in rules)
    return VS_HEAD + body


def route(tmp_path: Path, rule: str, *extra: str) -> Route:
    snap = build(tmp_path, vs(rule), *extra)
    return snap.routes.exact[HOST].routes[0]


# --------------------------------------------------------------------------- retryBudget


def test_retry_budget_fields_camel_and_snake_case(tmp_path: Path) -> None:
    snap = build(tmp_path, policy("retryBudget: {percent: 35.5, minRetryConcurrency: 7}"))
    assert cluster(snap).retry_budget == RetryBudget(percent=35.5, min_concurrency=7)
    # the proto names are accepted too, as protobuf's JSON mapping does; an integer percent
    # (a DoubleValue) is a float in the snapshot
    snap = build(tmp_path, policy("retry_budget: {percent: 25, min_retry_concurrency: 2}"))
    got = cluster(snap).retry_budget
    assert got == RetryBudget(percent=25.0, min_concurrency=2)
    assert got is not None and isinstance(got.percent, float)
    # every port of the service gets the top-level budget
    assert cluster(snap, 9090).retry_budget == got


def test_retry_budget_defaults_when_fields_absent(tmp_path: Path) -> None:
    # Istio applyRetryBudget (cluster_traffic_policy.go): percent defaults to 20 (the earlier
    # 0.2 was a bug fixed by istio/istio#59505) and minRetryConcurrency to 3, applied only when
    # > 0, so an explicit 0 is also 3
    cases = {
        "{}": RetryBudget(20.0, 3),
        "{percent: 0}": RetryBudget(0.0, 3),
        "{minRetryConcurrency: 0}": RetryBudget(20.0, 3),
        "{minRetryConcurrency: 5}": RetryBudget(20.0, 5),
        "{percent: 100, minRetryConcurrency: 1}": RetryBudget(100.0, 1),
    }
    for text, want in cases.items():
        snap = build(tmp_path, policy(f"retryBudget: {text}"))
        assert cluster(snap).retry_budget == want, text
    # no retryBudget: no budget (Istio has no default budget; the data plane's own default is
    # a Settings matter, not the translation's)
    snap = build(tmp_path, policy("loadBalancer: {simple: RANDOM}"))
    assert cluster(snap).retry_budget is None


def test_a_policy_with_only_a_retry_budget_is_valid(tmp_path: Path) -> None:
    # istio/istio#57322: "traffic policy must have at least one field" counts retryBudget
    problems, _ = findings(tmp_path, policy("retryBudget: {percent: 10}"))
    assert problems == []
    problems, _ = findings(tmp_path, dr("trafficPolicy: {}"))
    assert problems == [
        "doc0.yaml: DestinationRule/pay: spec.trafficPolicy: traffic policy must have at least one field"
    ]


def test_retry_budget_validation(tmp_path: Path) -> None:
    p = "doc0.yaml: DestinationRule/pay: spec.trafficPolicy.retryBudget"
    bad = {
        "{percent: 150}": [f"{p}.percent: retry budget percent 150 is not in range 0..100"],
        "{percent: -0.5}": [f"{p}.percent: retry budget percent -0.5 is not in range 0..100"],
        "{percent: .nan}": [f"{p}.percent: retry budget percent nan is not in range 0..100"],
        "{minRetryConcurrency: -2}": [
            f"{p}.minRetryConcurrency: min retry concurrency must be non-negative"
        ],
        "{budgetInterval: -1s}": [f"{p}.budgetInterval: budget interval must not be negative"],
        "{budgetInterval: 1500us}": [
            f"{p}.budgetInterval: only durations to ms precision are supported"
        ],
        '{percent: "20"}': [f"{p}.percent: must be a number, not a string"],
        "{budgetPercent: 20}": [f"{p}.budgetPercent: unknown field"],
        "{minRetryConcurrency: 2.5}": [
            f"{p}.minRetryConcurrency: must be an integer, not a number"
        ],
    }
    for text, want in bad.items():
        problems, _ = findings(tmp_path, policy(f"retryBudget: {text}"))
        assert problems == want, text


def test_retry_budget_is_not_a_port_level_field(tmp_path: Path) -> None:
    # TrafficPolicy.RetryBudget is a field of TrafficPolicy (so of a subset's policy too), not
    # of PortTrafficPolicy: Istio's schema rejects it there as an unknown field
    doc = policy(
        """\
        portLevelSettings:
        - port: {number: 80}
          retryBudget: {percent: 10}
        """
    )
    problems, _ = findings(tmp_path, doc)
    assert problems == [
        "doc0.yaml: DestinationRule/pay: spec.trafficPolicy.portLevelSettings[0].retryBudget: unknown field",
    ]


def test_budget_interval_is_accepted_and_not_applied(tmp_path: Path) -> None:
    doc = policy("retryBudget: {percent: 30, budgetInterval: 10s}")
    problems, warnings = findings(tmp_path, doc)
    assert problems == []
    assert (
        "doc0.yaml: DestinationRule/pay: spec.trafficPolicy.retryBudget.budgetInterval: "
        "accepted but not applied: meshproxy's retry budget counts only active and pending "
        "requests (Envoy's budgetInterval 0ms form)"
    ) in warnings
    # the snapshot carries the concurrent budget only: nothing else for the interval
    assert cluster(build(tmp_path, doc)).retry_budget == RetryBudget(30.0, 3)
    # 0ms is Envoy's default, the very form meshproxy applies: valid and not warned about
    problems, warnings = findings(tmp_path, policy("retryBudget: {budgetInterval: 0s}"))
    assert problems == [] and not [w for w in warnings if "budgetInterval" in w]


SUBSETS = """\
trafficPolicy:
  retryBudget: {percent: 40, minRetryConcurrency: 5}
  outlierDetection: {consecutive5xxErrors: 7}
  connectionPool:
    tcp: {maxConnections: 10}
subsets:
- name: v1
  labels: {version: v1}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    retryBudget: {percent: 10, minRetryConcurrency: 2}
- name: v3
  labels: {version: v3}
  trafficPolicy:
    outlierDetection: {consecutiveGatewayErrors: 2}
- name: v4
  labels: {version: v4}
  trafficPolicy:
    connectionPool:
      http: {http1MaxPendingRequests: 4}
"""


def test_subset_policies_override_group_by_group(tmp_path: Path) -> None:
    # Istio MergeSubsetTrafficPolicy: a subset's group replaces the DR's group of the same
    # name, the groups it leaves out are inherited; since istio/istio#59668 (issue #59667)
    # retryBudget is one of those groups: kept when a subset sets another group, replaced
    # when the subset sets its own
    snap = build(tmp_path, dr(SUBSETS))
    top = cluster(snap)
    dr_budget = RetryBudget(40.0, 5)
    dr_outlier = OutlierPolicy(consecutive_5xx=7)
    dr_pool = ConnectionPool(max_connections=10)
    assert (top.retry_budget, top.outlier, top.pool) == (dr_budget, dr_outlier, dr_pool)

    v1 = cluster(snap, subset="v1")  # no policy of its own: everything from the DR
    assert (v1.retry_budget, v1.outlier, v1.pool) == (dr_budget, dr_outlier, dr_pool)
    assert [e.address for e in v1.endpoints] == ["10.0.0.1"]

    v2 = cluster(snap, subset="v2")  # its budget replaces the DR's, the rest is inherited
    assert (v2.retry_budget, v2.outlier, v2.pool) == (RetryBudget(10.0, 2), dr_outlier, dr_pool)
    assert v2.policy_meta is not None and v2.policy_meta.path == "spec.subsets[1].trafficPolicy"

    v3 = cluster(snap, subset="v3")  # the outlier group is replaced whole, not field-merged
    assert v3.outlier == OutlierPolicy(consecutive_gateway_errors=2)
    assert (v3.retry_budget, v3.pool) == (dr_budget, dr_pool)

    v4 = cluster(snap, subset="v4")  # the pool group is replaced whole: maxConnections is gone
    assert v4.pool == ConnectionPool(max_pending_requests=4)
    assert (v4.retry_budget, v4.outlier) == (dr_budget, dr_outlier)
    # the other port's subset clusters merge the same way
    assert cluster(snap, 9090, "v2").retry_budget == RetryBudget(10.0, 2)


def test_port_level_settings_and_the_budget(tmp_path: Path) -> None:
    # Istio GetPortLevelTrafficPolicy returns shadowCopyPortTrafficPolicy(pls): the port's
    # four groups and nothing else, so a port with port-level settings has no top-level
    # retryBudget ("traffic settings specified at the destination-level will not be
    # inherited when overridden by port-level settings")
    doc = dr(
        """\
        trafficPolicy:
          retryBudget: {percent: 40}
          portLevelSettings:
          - port: {number: 9090}
            loadBalancer: {simple: RANDOM}
        subsets:
        - name: v1
          labels: {version: v1}
        """
    )
    snap = build(tmp_path, doc)
    assert cluster(snap).retry_budget == RetryBudget(40.0, 3)
    admin = cluster(snap, 9090)
    assert admin.retry_budget is None and admin.lb.kind is LbKind.RANDOM
    assert cluster(snap, 9090, "v1").retry_budget is None
    # a subset's own port-level settings replace the four groups but carry no budget, so
    # mergeTrafficPolicy keeps the budget merged so far: the DR's, not the subset's own
    doc = dr(
        """\
        trafficPolicy:
          retryBudget: {percent: 40}
        subsets:
        - name: v1
          labels: {version: v1}
          trafficPolicy:
            retryBudget: {percent: 5}
            portLevelSettings:
            - port: {number: 9090}
              loadBalancer: {simple: RANDOM}
        """
    )
    snap = build(tmp_path, doc)
    assert cluster(snap, 80, "v1").retry_budget == RetryBudget(5.0, 3)
    sub_admin = cluster(snap, 9090, "v1")
    assert sub_admin.retry_budget == RetryBudget(40.0, 3) and sub_admin.lb.kind is LbKind.RANDOM


def test_incremental_builds_follow_a_budget_edit(tmp_path: Path) -> None:
    se = _write(tmp_path, "se.yaml", SE)
    drp = _write(tmp_path, "dr.yaml", policy("retryBudget: {percent: 40}"))
    builder = IncrementalBuilder(ProxyIdentity())
    snap, report = builder.build([se, drp])
    assert report.problems == [] and snap is not None
    assert cluster(snap).retry_budget == RetryBudget(40.0, 3)
    _write(tmp_path, "dr.yaml", policy("retryBudget: {percent: 15, minRetryConcurrency: 9}"))
    os.utime(drp, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    snap, report = builder.build([se, drp])
    assert report.problems == [] and snap is not None
    assert cluster(snap).retry_budget == RetryBudget(15.0, 9)
    fresh, _ = build_snapshot([se, drp], ProxyIdentity())
    assert fresh is not None and fresh.clusters == snap.clusters


# --------------------------------------------------------------------------- outlierDetection


def outlier(tmp_path: Path, body: str) -> OutlierPolicy | None:
    return cluster(build(tmp_path, policy(f"outlierDetection: {body}"))).outlier


def test_outlier_defaults(tmp_path: Path) -> None:
    # no outlierDetection: no detection at all (Istio leaves Cluster.outlier_detection unset)
    assert cluster(build(tmp_path, policy("loadBalancer: {simple: RANDOM}"))).outlier is None
    # an empty block: Envoy's defaults as Istio leaves them (applyOutlierDetection sets only
    # what is given): consecutive 5xx 5 enforced, gateway errors not enforced, local-origin 5,
    # interval 10s, base ejection 30s, max ejection 10 %, and the panic threshold 0 (Istio
    # always writes minHealthPercent into healthy_panic_threshold, 0 when absent)
    got = outlier(tmp_path, "{}")
    assert got == OutlierPolicy(
        consecutive_5xx=5,
        consecutive_gateway_errors=None,
        split_external_local_origin_errors=False,
        consecutive_local_origin_failures=5,
        interval=10.0,
        base_ejection_time=30.0,
        max_ejection_percent=10,
        min_health_percent=0,
    )


def test_outlier_values_and_zero_rules(tmp_path: Path) -> None:
    body = (
        "{consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 2s,"
        " baseEjectionTime: 1m, maxEjectionPercent: 50, minHealthPercent: 30}"
    )
    assert outlier(tmp_path, body) == OutlierPolicy(
        consecutive_5xx=3,
        consecutive_gateway_errors=2,
        interval=2.0,
        base_ejection_time=60.0,
        max_ejection_percent=50,
        min_health_percent=30,
    )
    # Consecutive_5XxErrors / ConsecutiveGatewayErrors are wrappers: an explicit 0 sets the
    # enforcing percentage to 0, i.e. disables that detector
    got = outlier(tmp_path, "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 0}")
    assert got is not None
    assert (got.consecutive_5xx, got.consecutive_gateway_errors) == (None, None)
    # MaxEjectionPercent is copied only when > 0: 0 leaves Envoy's 10
    got = outlier(tmp_path, "{maxEjectionPercent: 0}")
    assert got is not None and got.max_ejection_percent == 10
    # 100 % ejection and a 100 % panic threshold are accepted values
    got = outlier(tmp_path, "{maxEjectionPercent: 100, minHealthPercent: 100}")
    assert got is not None and (got.max_ejection_percent, got.min_health_percent) == (100, 100)


def test_local_origin_failures_apply_only_with_split(tmp_path: Path) -> None:
    # applyOutlierDetection: ConsecutiveLocalOriginFailure is set only with
    # SplitExternalLocalOriginErrors and only when > 0; otherwise Envoy's default 5 stays
    got = outlier(
        tmp_path, "{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 8}"
    )
    assert got is not None and got.split_external_local_origin_errors
    assert got.consecutive_local_origin_failures == 8
    got = outlier(
        tmp_path, "{splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 0}"
    )
    assert got is not None and got.consecutive_local_origin_failures == 5  # was: disabled
    got = outlier(tmp_path, "{splitExternalLocalOriginErrors: true}")
    assert got is not None and got.consecutive_local_origin_failures == 5
    # without split the field is an error when > 0 (Istio's message), and irrelevant at 0
    problems, _ = findings(
        tmp_path, policy("outlierDetection: {consecutiveLocalOriginFailures: 3}")
    )
    assert problems == [
        "doc0.yaml: DestinationRule/pay: spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures: "
        "outlier detection consecutive local origin failures is specified, but split external "
        "local origin errors is set to false"
    ]


def test_deprecated_consecutive_errors_is_warned_about_and_ignored(tmp_path: Path) -> None:
    # Istio's applyOutlierDetection never reads the deprecated consecutiveErrors (validation
    # only warns), so Envoy's default consecutive 5xx of 5 stays; it used to be read here as
    # an alias of consecutive5xxErrors
    doc = policy("outlierDetection: {consecutiveErrors: 2}")
    problems, warnings = findings(tmp_path, doc)
    assert problems == []
    assert any(
        "consecutiveErrors: outlier detection consecutive errors is deprecated" in w
        for w in warnings
    )
    got = cluster(build(tmp_path, doc)).outlier
    assert got == OutlierPolicy()
    got = outlier(tmp_path, "{consecutiveErrors: 2, consecutive5xxErrors: 4}")
    assert got is not None and got.consecutive_5xx == 4


# --------------------------------------------------------------------------- connectionPool


def pool(tmp_path: Path, body: str) -> ConnectionPool:
    return cluster(build(tmp_path, policy(f"connectionPool: {body}"))).pool


def test_pool_defaults_and_values(tmp_path: Path) -> None:
    # no connectionPool: Istio's getDefaultCircuitBreakerThresholds (MaxUint32 everywhere),
    # the mesh connectTimeout of 10s and Envoy's 1h upstream idle timeout
    default = cluster(build(tmp_path, policy("loadBalancer: {simple: RANDOM}"))).pool
    assert default == ConnectionPool()
    assert (default.max_connections, default.connect_timeout, default.idle_timeout) == (
        2**32 - 1,
        10.0,
        3600.0,
    )
    got = pool(
        tmp_path,
        """{tcp: {maxConnections: 100, connectTimeout: 250ms},
            http: {http1MaxPendingRequests: 5, http2MaxRequests: 50,
                   maxRequestsPerConnection: 7, maxRetries: 3, idleTimeout: 30s}}""",
    )
    assert got == ConnectionPool(
        max_connections=100,
        connect_timeout=0.25,
        max_pending_requests=5,
        max_requests=50,
        max_requests_per_connection=7,
        max_retries=3,
        idle_timeout=30.0,
    )


def test_pool_zero_means_unset(tmp_path: Path) -> None:
    # applyConnectionPool copies each limit only when > 0 ("FIXME: there isn't a way to
    # distinguish between unset values and zero values"): zeros keep the defaults
    got = pool(
        tmp_path,
        """{tcp: {maxConnections: 0},
            http: {http1MaxPendingRequests: 0, http2MaxRequests: 0,
                   maxRequestsPerConnection: 0, maxRetries: 0}}""",
    )
    assert got == ConnectionPool()


def test_tcp_idle_timeout_is_the_fallback_idle_timeout(tmp_path: Path) -> None:
    # applyConnectionPool: `idleTimeout = settings.Http.IdleTimeout` then `if idleTimeout ==
    # nil { idleTimeout = settings.Tcp.IdleTimeout }`, both into the cluster's
    # common_http_protocol_options.idle_timeout (it was ignored here before)
    assert pool(tmp_path, "{tcp: {idleTimeout: 45s}}").idle_timeout == 45.0
    both = pool(tmp_path, "{tcp: {idleTimeout: 45s}, http: {idleTimeout: 20s}}")
    assert both.idle_timeout == 20.0


def test_http2_and_socket_knobs_are_accepted_and_said_not_applied(tmp_path: Path) -> None:
    doc = policy(
        """\
        connectionPool:
          tcp:
            maxConnectionDuration: 1h
            tcpKeepalive: {time: 7200s, interval: 75s, probes: 9}
          http:
            h2UpgradePolicy: UPGRADE
            maxConcurrentStreams: 100
        """
    )
    problems, warnings = findings(tmp_path, doc)
    assert problems == []
    p = "doc0.yaml: DestinationRule/pay: spec.trafficPolicy.connectionPool"
    said = [w for w in warnings if w.startswith(p)]
    assert said == [
        f"{p}.http.h2UpgradePolicy: accepted but not applied: meshproxy does not upgrade "
        "upstream connections to HTTP/2",
        f"{p}.http.maxConcurrentStreams: accepted but not applied: it limits HTTP/2 streams "
        "and meshproxy's upstreams are HTTP/1.1",
        f"{p}.tcp.maxConnectionDuration: accepted but not applied: meshproxy does not close "
        "upstream connections by age",
        f"{p}.tcp.tcpKeepalive: accepted but not applied: meshproxy sets no TCP keepalive on "
        "upstream sockets",
    ]
    assert cluster(build(tmp_path, doc)).pool == ConnectionPool()
    # DO_NOT_UPGRADE and useClientProtocol describe what an HTTP/1.1 upstream does already
    doc = policy(
        "connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: true}}"
    )
    problems, warnings = findings(tmp_path, doc)
    assert problems == [] and not [w for w in warnings if "connectionPool" in w]
    # Istio: "use client protocol must not be true when H2UpgradePolicy is UPGRADE"
    doc = policy("connectionPool: {http: {h2UpgradePolicy: UPGRADE, useClientProtocol: true}}")
    problems, _ = findings(tmp_path, doc)
    assert problems == [
        f"{p}.http: use client protocol must not be true when H2UpgradePolicy is UPGRADE"
    ]


# --------------------------------------------------------------------------- VirtualService

ROUTE = "route: [{destination: {host: pay.internal, port: {number: 80}}}]"


def rule(*lines: str) -> str:
    return "- " + ROUTE + "\n" + "".join(f"  {ln}\n" for ln in lines)


def test_retries_without_a_block_and_with_attempts_only(tmp_path: Path) -> None:
    assert route(tmp_path, rule()).retries is DEFAULT_RETRY
    # retry.ConvertPolicy: a block without retryOn starts from the default policy, so it keeps
    # the default conditions and the default codes; only NumRetries changes
    got = route(tmp_path, rule("retries: {attempts: 4, perTryTimeout: 1.5s}")).retries
    assert got == RetryPolicy(
        attempts=4,
        per_try_timeout=1.5,
        retry_on=DEFAULT_RETRY.retry_on,
        retriable_status_codes=DEFAULT_RETRY.retriable_status_codes,
    )


def test_retry_on_replaces_conditions_and_codes(tmp_path: Path) -> None:
    # parseRetryOn: a retryOn replaces both RetryOn and RetriableStatusCodes; a part that is a
    # known HTTP status becomes a code, and "retriable-status-codes" is added when codes are
    # found and it is missing
    got = route(tmp_path, rule("retries: {attempts: 2, retryOn: '5xx,gateway-error'}")).retries
    assert got is not None
    assert got.retry_on == {"5xx", "gateway-error"} and got.retriable_status_codes == frozenset()
    got = route(
        tmp_path, rule("retries: {attempts: 2, retryOn: 'connect-failure,503,504'}")
    ).retries
    assert got is not None
    assert got.retry_on == {"connect-failure", "retriable-status-codes"}
    assert got.retriable_status_codes == {503, 504}
    got = route(tmp_path, rule("retries: {attempts: 2, retryOn: retriable-status-codes}")).retries
    assert got is not None
    assert got.retry_on == {"retriable-status-codes"} and got.retriable_status_codes == frozenset()
    got = route(tmp_path, rule("retries: {attempts: 1, retryRemoteLocalities: true}")).retries
    assert got is not None and got.retry_remote_localities


def test_zero_attempts_disable_retries(tmp_path: Path) -> None:
    # ConvertPolicy: `if in.Attempts <= 0 { return nil }`: no retries (not the default policy);
    # an absent attempts is 0 too
    assert route(tmp_path, rule("retries: {attempts: 0}")).retries == RetryPolicy(attempts=0)
    problems, _ = findings(tmp_path, vs(rule("retries: {attempts: -1}")))
    assert problems == [
        "doc0.yaml: VirtualService/pay: spec.http[0].retries.attempts: attempts cannot be negative"
    ]
    # validateHTTPRetry tests `RetryOn != ""`: an empty retryOn with 0 attempts is fine
    problems, _ = findings(tmp_path, vs(rule("retries: {attempts: 0, retryOn: ''}")))
    assert problems == []
    problems, _ = findings(tmp_path, vs(rule("retries: {perTryTimeout: 2s}")))
    assert problems == [
        "doc0.yaml: VirtualService/pay: spec.http[0].retries: http retry policy configured "
        "when attempts are set to 0 (disabled)"
    ]


def test_timeout(tmp_path: Path) -> None:
    assert route(tmp_path, rule()).timeout is None
    assert route(tmp_path, rule("timeout: 2.5s")).timeout == 2.5
    assert route(tmp_path, rule("timeout: 0s")).timeout is None  # 0 disables the route timeout


def test_fault_percentages(tmp_path: Path) -> None:
    # TranslateFault: no percentage = 0 % (Envoy's FractionalPercent default); the deprecated
    # integer `percent` is used only when `percentage` is absent, and a present percentage
    # whose value is absent reads as 0
    f = route(tmp_path, rule("fault: {delay: {fixedDelay: 1s}}")).fault
    assert f is not None and (f.delay, f.delay_fraction, f.abort_status) == (1.0, 0.0, None)
    f = route(tmp_path, rule("fault: {delay: {fixedDelay: 1s, percent: 30}}")).fault
    assert f is not None and f.delay_fraction == pytest.approx(0.3)
    f = route(tmp_path, rule("fault: {delay: {fixedDelay: 1s, percentage: {value: 12.5}}}")).fault
    assert f is not None and f.delay_fraction == pytest.approx(0.125)
    f = route(tmp_path, rule("fault: {delay: {fixedDelay: 1s, percentage: {}, percent: 30}}")).fault
    assert f is not None and f.delay_fraction == 0.0
    f = route(tmp_path, rule("fault: {abort: {httpStatus: 503}}")).fault
    assert f is not None and (f.abort_status, f.abort_fraction, f.delay) == (503, 0.0, None)
    f = route(tmp_path, rule("fault: {abort: {httpStatus: 418, percentage: {value: 100}}}")).fault
    assert f is not None and (f.abort_status, f.abort_fraction) == (418, 1.0)


def test_fault_abort_status_range(tmp_path: Path) -> None:
    # Istio's validateHTTPStatus accepts 200..600 ("status > 600"), but Envoy's
    # FaultAbort.http_status is `uint32 {gte: 200, lt: 600}`, so 600 is NACKed by the proxy:
    # the Istio+Envoy system rejects it, and so do we (the message is Istio's)
    p = "doc0.yaml: VirtualService/pay: spec.http[0].fault.abort.httpStatus"
    for status, ok in ((199, False), (200, True), (599, True), (600, False)):
        problems, _ = findings(tmp_path, vs(rule(f"fault: {{abort: {{httpStatus: {status}}}}}")))
        want = [] if ok else [f"{p}: HTTP status {status} is not in range 200-599"]
        assert problems == want, status


def test_mirror_percentages(tmp_path: Path) -> None:
    # MirrorPercent / MirrorPercentByPolicy (pilot/pkg/networking/core/route): no percentage
    # mirrors 100 %; a percentage of 0 ("If zero percent is provided explicitly, we should
    # not mirror"), or `{}` whose value reads as 0, is no mirror policy at all
    se2 = SE.replace("name: pay}", "name: shadow}").replace("pay.internal", "shadow.internal")
    shadow = "mirror: {host: shadow.internal, port: {number: 80}}"
    r = route(tmp_path, rule(shadow), se2)
    assert [(m.cluster, m.fraction) for m in r.mirrors] == [("shadow.internal:80", 1.0)]
    for pct in ("mirrorPercentage: {value: 0}", "mirrorPercentage: {}", "mirrorPercent: 0"):
        assert route(tmp_path, rule(shadow, pct), se2).mirrors == (), pct
    r = route(tmp_path, rule(shadow, "mirrorPercent: 30"), se2)
    assert [m.fraction for m in r.mirrors] == [pytest.approx(0.3)]
    # mirrorPercentage wins over the deprecated mirrorPercent
    r = route(tmp_path, rule(shadow, "mirrorPercent: 30", "mirrorPercentage: {value: 5}"), se2)
    assert [m.fraction for m in r.mirrors] == [pytest.approx(0.05)]
    mirrors = (
        "mirrors: [{destination: {host: shadow.internal, port: {number: 80}}},"
        " {destination: {host: shadow.internal, port: {number: 9090}}, percentage: {value: 0}},"
        " {destination: {host: pay.internal, port: {number: 9090}}, percentage: {value: 25}}]"
    )
    r = route(tmp_path, rule(mirrors), se2)
    assert [(m.cluster, m.fraction) for m in r.mirrors] == [
        ("shadow.internal:80", 1.0),
        ("pay.internal:9090", 0.25),
    ]
