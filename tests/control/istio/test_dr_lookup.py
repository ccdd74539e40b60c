"""DestinationRule selection: Istio's namespace precedence (``PushContext.destinationRule``).

The pure index (:class:`DestinationRuleIndex`) first, then what the translator makes of it (the
cluster's load balancer and policy origin) and the validator's subset cross-check, which must
pick the very same rule.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from control.istio import build_snapshot, validate_paths
from control.istio.load import load_documents
from control.istio.validate import ROOT_NAMESPACE, DestinationRuleIndex, ValidationReport
from meshproxy.config.model import LbKind, ProxyIdentity


def _dr(ns: str, name: str, host: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"host": host, **spec},
    }


def _index(*docs: dict[str, Any]) -> DestinationRuleIndex:
    report = ValidationReport()
    rules = load_documents("t.yaml", list(docs), report)
    assert report.problems == []
    return DestinationRuleIndex(rules)


def _names(index: DestinationRuleIndex, host: str, proxy_ns: str, svc_ns: str | None) -> list[str]:
    return [f"{r.namespace}/{r.name}" for r in index.lookup(host, proxy_ns, svc_ns)]


def test_proxy_namespace_wildcard_beats_exact_host_of_another_namespace() -> None:
    ix = _index(
        _dr("other", "exact", "api.example.com"),
        _dr("default", "wild", "*.example.com"),
    )
    assert _names(ix, "api.example.com", "default", "other") == ["default/wild"]
    # from the service's own namespace, its exact rule
    assert _names(ix, "api.example.com", "other", "other") == ["other/exact"]


def test_most_specific_host_within_the_namespace() -> None:
    ix = _index(
        _dr("default", "all", "*"),
        _dr("default", "wide", "*.com"),
        _dr("default", "narrow", "*.example.com"),
        _dr("default", "exact", "api.example.com"),
    )
    assert _names(ix, "api.example.com", "default", None) == ["default/exact"]
    assert _names(ix, "web.example.com", "default", None) == ["default/narrow"]
    assert _names(ix, "web.other.com", "default", None) == ["default/wide"]
    assert _names(ix, "web.other.org", "default", None) == ["default/all"]


def test_service_namespace_when_the_proxy_namespace_has_none() -> None:
    ix = _index(
        _dr("other", "svc", "api.example.com"),
        _dr(ROOT_NAMESPACE, "mesh", "*"),
    )
    assert _names(ix, "api.example.com", "default", "other") == ["other/svc"]


def test_root_namespace_applies_mesh_wide_last() -> None:
    ix = _index(_dr(ROOT_NAMESPACE, "mesh", "*.example.com"))
    assert _names(ix, "api.example.com", "default", "other") == ["istio-system/mesh"]
    ix = _index(
        _dr(ROOT_NAMESPACE, "mesh", "api.example.com"),
        _dr("other", "svc", "*.example.com"),
    )
    # the service's namespace comes before the root, even with a less specific host
    assert _names(ix, "api.example.com", "default", "other") == ["other/svc"]


def test_unrelated_namespace_never_applies() -> None:
    ix = _index(_dr("thirdparty", "third", "api.example.com"))
    assert _names(ix, "api.example.com", "default", "other") == []
    assert _names(ix, "api.example.com", "thirdparty", "other") == ["thirdparty/third"]


def test_export_to_is_respected() -> None:
    private = _dr("other", "private", "api.example.com", exportTo=["."])
    ix = _index(private)
    assert _names(ix, "api.example.com", "default", "other") == []
    assert _names(ix, "api.example.com", "other", "other") == ["other/private"]
    ix = _index(_dr("other", "to-team", "api.example.com", exportTo=["team"]))
    assert _names(ix, "api.example.com", "default", "other") == []
    assert _names(ix, "api.example.com", "team", "other") == ["other/to-team"]
    # not exported to itself: not even its own namespace gets it
    assert _names(ix, "api.example.com", "other", "other") == []
    ix = _index(_dr("other", "star", "api.example.com", exportTo=["*"]))
    assert _names(ix, "api.example.com", "default", "other") == ["other/star"]
    # the most specific exported host is chosen first; not exported to us: nothing from there
    ix = _index(
        _dr("other", "exact", "api.example.com", exportTo=["team"]),
        _dr("other", "wild", "*.example.com"),
        _dr(ROOT_NAMESPACE, "mesh", "*"),
    )
    assert _names(ix, "api.example.com", "default", "other") == ["istio-system/mesh"]
    # a private rule does not hide an exported, less specific one from other namespaces
    ix = _index(
        _dr("other", "exact", "api.example.com", exportTo=["."]),
        _dr("other", "wild", "*.example.com"),
    )
    assert _names(ix, "api.example.com", "default", "other") == ["other/wild"]


def test_proxy_in_the_root_namespace_sees_the_service_namespace_first() -> None:
    ix = _index(
        _dr(ROOT_NAMESPACE, "mesh", "*"),
        _dr("other", "svc", "api.example.com"),
    )
    assert _names(ix, "api.example.com", ROOT_NAMESPACE, "other") == ["other/svc"]
    # ... except for the root's rules exported to itself alone
    ix = _index(
        _dr(ROOT_NAMESPACE, "local", "*", exportTo=["."]),
        _dr("other", "svc", "api.example.com"),
    )
    assert _names(ix, "api.example.com", ROOT_NAMESPACE, "other") == ["istio-system/local"]


def test_same_namespace_rules_for_the_host_are_all_returned_in_load_order() -> None:
    ix = _index(
        _dr("default", "a", "api.example.com"),
        _dr("other", "x", "api.example.com"),
        _dr("default", "b", "api.example.com"),
    )
    assert _names(ix, "api.example.com", "default", "other") == ["default/a", "default/b"]


# --------------------------------------------------------------------------- end to end

SERVICES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: other}
spec:
  hosts: [api.example.com]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1, labels: {v: "1"}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api2, namespace: other}
spec:
  hosts: [api2.example.com]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.2}]
"""


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "mesh.yaml"
    p.write_text(SERVICES + "---\n" + textwrap.dedent(text))
    return str(p)


def _policies(path: str, ns: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    snap, report = build_snapshot([path], ProxyIdentity(namespace=ns, labels=labels or {}))
    assert report.problems == [] and snap is not None
    return {
        name: (c.lb.kind, c.policy_meta and f"{c.policy_meta.namespace}/{c.policy_meta.name}")
        for name, c in snap.clusters.items()
    }


def test_translation_follows_the_namespace_precedence(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: wild, namespace: default}
        spec:
          host: "*.example.com"
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: exact, namespace: other}
        spec:
          host: api.example.com
          trafficPolicy: {loadBalancer: {simple: RANDOM}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: third, namespace: thirdparty}
        spec:
          host: api2.example.com
          trafficPolicy: {loadBalancer: {simple: RANDOM}}
        """,
    )
    assert _policies(p, "default") == {
        "api.example.com": (LbKind.ROUND_ROBIN, "default/wild"),
        "api2.example.com": (LbKind.ROUND_ROBIN, "default/wild"),
    }
    assert _policies(p, "other") == {
        "api.example.com": (LbKind.RANDOM, "other/exact"),
        "api2.example.com": (LbKind.LEAST_REQUEST, None),
    }
    assert _policies(p, "elsewhere") == {
        "api.example.com": (LbKind.RANDOM, "other/exact"),
        "api2.example.com": (LbKind.LEAST_REQUEST, None),
    }
    assert _policies(p, "thirdparty")["api2.example.com"] == (LbKind.RANDOM, "thirdparty/third")


def test_translation_workload_selector_stays_in_its_namespace(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: picky, namespace: other}
        spec:
          host: api2.example.com
          workloadSelector: {matchLabels: {app: web}}
          trafficPolicy: {loadBalancer: {simple: RANDOM}}
        """,
    )
    assert _policies(p, "other", {"app": "web"})["api2.example.com"] == (
        LbKind.RANDOM,
        "other/picky",
    )
    assert _policies(p, "default", {"app": "web"})["api2.example.com"] == (
        LbKind.LEAST_REQUEST,
        None,
    )


# --------------------------------------------------------------------------- validation

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs, namespace: {ns}}}
spec:
  hosts: [api.example.com]
  http:
  - route: [{{destination: {{host: api.example.com, subset: {subset}}}}}]
"""


@pytest.fixture
def relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _validate(root: Path, vs_ns: str, subset: str, rules: str) -> tuple[list[str], list[str]]:
    text = SERVICES + "---\n" + VS.format(ns=vs_ns, subset=subset) + "---\n"
    (root / "m.yaml").write_text(text + textwrap.dedent(rules))
    r = validate_paths(["m.yaml"])
    return r.problems, r.warnings


RULES = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wild, namespace: default}
spec:
  host: "*.example.com"
  subsets: [{name: a, labels: {v: "1"}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: exact, namespace: other}
spec:
  host: api.example.com
  subsets: [{name: b, labels: {v: "1"}}]
"""

SUBSET_PATH = "m.yaml: VirtualService/vs: spec.http[0].route[0].destination.subset: "


def test_subset_check_uses_the_rule_that_applies(relative: Path) -> None:
    # the proxy namespace's wildcard applies: it defines a, not b
    assert _validate(relative, "default", "a", RULES) == ([], [])
    problems, warnings = _validate(relative, "default", "b", RULES)
    assert problems == [
        SUBSET_PATH + "subset 'b' is not defined by DestinationRule/wild for host api.example.com"
    ]
    assert warnings == []
    # from another namespace, the service namespace's exact rule applies
    assert _validate(relative, "shop", "b", RULES) == ([], [])
    problems, _ = _validate(relative, "shop", "a", RULES)
    assert problems == [
        SUBSET_PATH
        + "subset 'a' is not defined by DestinationRule/other/exact for host api.example.com"
    ]


def test_subset_check_warns_when_no_rule_applies(relative: Path) -> None:
    rules = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: third, namespace: thirdparty}
    spec:
      host: api.example.com
      subsets: [{name: a, labels: {v: "1"}}]
    """
    problems, warnings = _validate(relative, "default", "a", rules)
    assert problems == []
    assert warnings == [
        SUBSET_PATH + "subset 'a' of host api.example.com: no DestinationRule for this host "
        "applies to namespace default (only those of the proxy's namespace, or exported from "
        "the service's namespace or istio-system, do) (the route will get no endpoints)"
    ]
    problems, warnings = _validate(relative, "default", "a", "")
    assert problems == []
    assert warnings == [
        SUBSET_PATH + "subset 'a' of host api.example.com: no DestinationRule for this host "
        "is loaded (the route will get no endpoints)"
    ]
