# ruff: noqa: E501 - user-facing messages keep Istio's exact wording on one line
"""Istio's semantic validation rules, applied to typed resources.

Theory of operation
-------------------
The decoder (:mod:`control.istio.schema`) already rejected unknown fields and wrong types.
This module applies the rules of istio/istio ``pkg/config/validation`` on the typed specs:
ranges (ports, percentages, status codes), one-of constraints (route / redirect /
directResponse), durations (>= 1ms, ms precision), regexes (RE2 syntax checked with Python's
``re`` plus a scan for the Python-only constructs RE2 rejects), host syntax, exportTo, label
selectors, and so on. Messages follow Istio's wording so users can search for them.

Each ``check_*`` function receives a :class:`Checker` that formats every finding as
``FILE: Kind/name: field.path: message`` and collects problems (errors) and warnings
separately; nothing stops at the first problem.

:func:`check_references` runs after all files are loaded and checks what needs several
resources at once: a route's ``subset`` must be defined by the DestinationRule(s) that apply
to its host for a proxy of the VirtualService's namespace (see
:meth:`DestinationRuleIndex.lookup`: Istio's namespace precedence), when one does (a warning
when none does), duplicate DestinationRules.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from control.istio import hosts as H
from control.istio.resources import (
    AuthorizationPolicySpec,
    ClientTLSSettings,
    ConnectionPoolSettings,
    CorsPolicy,
    Destination,
    DestinationRuleSpec,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRoute,
    HTTPRouteDestination,
    L4MatchAttributes,
    LoadBalancerSettings,
    OutlierDetection,
    PeerAuthenticationSpec,
    Percent,
    Resource,
    Resources,
    RetryBudget,
    RouteDestination,
    RuleFrom,
    RuleTo,
    ServiceEntrySpec,
    StringMatch,
    TLSMatchAttributes,
    TrafficPolicy,
    VirtualServiceSpec,
    WorkloadEntrySpec,
    WorkloadSelector,
)
from control.istio.schema import Duration

__all__ = [
    "Checker",
    "ValidationReport",
    "check_references",
    "check_spec",
    "compile_re2",
]


@dataclass
class ValidationReport:
    """Outcome of validating a set of files: one formatted line per finding."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def extend(self, other: ValidationReport) -> None:
        self.problems.extend(other.problems)
        self.warnings.extend(other.warnings)


class Checker:
    """Collects findings for one resource as ``FILE: Kind/name: path: message`` lines."""

    __slots__ = ("prefix", "problems", "warnings")

    def __init__(self, file: str, ref: str, report: ValidationReport) -> None:
        self.prefix = f"{file}: {ref}: "
        self.problems = report.problems
        self.warnings = report.warnings

    def err(self, path: str, msg: str) -> None:
        self.problems.append(f"{self.prefix}{path}: {msg}")

    def warn(self, path: str, msg: str) -> None:
        self.warnings.append(f"{self.prefix}{path}: {msg}")


# --------------------------------------------------------------------------- small rules

_HEADER_NAME = re.compile(r"^[-_A-Za-z0-9]+$")
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_BAD_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

SUPPORTED_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
)
RETRY_ON_POLICIES = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
KNOWN_STATUS = frozenset(int(s) for s in HTTPStatus)
GRPC_STATUS = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
PROTOCOLS = frozenset(
    {
        "HTTP",
        "HTTPS",
        "HTTP2",
        "HTTP_PROXY",
        "GRPC",
        "GRPC-WEB",
        "TCP",
        "TLS",
        "UDP",
        "MONGO",
        "REDIS",
        "MYSQL",
        "THRIFT",
    }
)
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-WEB"})
TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})


def check_port(c: Checker, path: str, port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        c.err(path, f"port number {port} must be in the range 1..65535")


def check_duration(c: Checker, path: str, d: Duration | None) -> None:
    """Istio ``ValidateDuration``: at least 1ms, and a whole number of milliseconds."""
    if d is None:
        return
    if d < 0.001 - 1e-12:
        c.err(path, "duration must be greater than 1ms")
    elif abs(d * 1000 - round(d * 1000)) > 1e-6:
        c.err(path, "only durations to ms precision are supported")


def check_percent_int(c: Checker, path: str, v: int | None) -> None:
    if v is not None and not 0 <= v <= 100:
        c.err(path, f"percentage {v} is not in range 0..100")


def check_percentage(c: Checker, path: str, p: Percent | None) -> None:
    if p is None or p.value is None:
        return
    v = p.value
    if v < 0.0 or v > 100.0 or (0.0 < v < 0.0001):
        c.err(f"{path}.value", f"percentage {v:g} is neither 0.0, nor in range [0.0001, 100.0]")


def check_labels(c: Checker, path: str, labels: Mapping[str, str]) -> None:
    """Kubernetes label syntax (Istio ``labels.Instance.Validate``)."""
    for k, v in labels.items():
        name = k.rsplit("/", 1)[-1]
        prefix = k[: -len(name) - 1] if "/" in k else ""
        if not name or len(name) > 63 or not _LABEL_NAME.match(name):
            c.err(f"{path}.{k}", f"invalid label key {k!r}")
        elif prefix and not H.is_subdomain(prefix):
            c.err(f"{path}.{k}", f"invalid label key prefix {prefix!r}")
        if len(v) > 63 or not _LABEL_VALUE.match(v):
            c.err(f"{path}.{k}", f"invalid label value {v!r}")


def check_selector_labels(c: Checker, path: str, labels: Mapping[str, str], what: str) -> None:
    for k, v in labels.items():
        if k == "":
            c.err(path, f"empty key is not supported in selector: {k}={v}")
        if "*" in k or "*" in v:
            c.err(f"{path}.{k}", f"wildcard is not supported in selector: {k}={v}")
    if not labels:
        c.warn(path, f"workload selector specified without labels; {what}")


def check_export_to(
    c: Checker, path: str, namespace: str, export_to: tuple[str, ...], service_entry: bool = False
) -> None:
    seen: set[str] = set()
    for i, e in enumerate(export_to):
        key = namespace if e == "." else e
        p = f"{path}[{i}]"
        if key in seen:
            if key != e:
                c.err(p, f"duplicate entries in exportTo: . and current namespace {namespace}")
            else:
                c.err(p, f"duplicate entries in exportTo for entry {e}")
            continue
        if e == "~":
            if not service_entry:
                c.err(p, "exportTo '~' is only allowed for service entries")
                continue
        elif e != "*" and not H.is_dns1123_label(key):
            c.err(p, f"invalid exportTo value {e!r}: must be '.', '*' or a namespace name")
            continue
        seen.add(key)
    if "*" in seen and len(export_to) > 1:
        c.err(path, "cannot have both public (*) and non-public exportTo values for a resource")
    if "~" in seen and len(export_to) > 1:
        c.err(path, "cannot export service entry to no one (~) and someone")


_LOOKAROUND = re.compile(r"\(\?(?:=|!|<=|<!|>)")


def compile_re2(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """Compile an RE2 regex with Python's ``re``.

    RE2-only spellings Python lacks are translated (``\\z`` -> ``\\Z``); Python-only
    constructs RE2 rejects (look-around, atomic groups, back-references) raise ``re.error``.
    """
    out: list[str] = []
    i = 0
    in_class = False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt == "z" and not in_class:
                out.append("\\Z")
                i += 2
                continue
            if nxt.isdigit() and nxt != "0" and not in_class:
                raise re.error(f"back-reference \\{nxt} is not supported by RE2")
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
            # a ']' right after '[' or '[^' is literal
            j = i + 1
            if j < len(pattern) and pattern[j] == "^":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                out.append(pattern[i : j + 1])
                i = j + 1
                continue
        elif ch == "]" and in_class:
            in_class = False
        elif ch == "(" and not in_class and _LOOKAROUND.match(pattern, i):
            raise re.error("look-around and atomic groups are not supported by RE2")
        out.append(ch)
        i += 1
    return re.compile("".join(out), flags)


def check_regex(c: Checker, path: str, regex: str) -> None:
    if regex == "":
        c.err(path, "regex string match should not be empty")
        return
    if len(regex) > 1024:
        c.err(path, "regex is too large, max length allowed is 1024")
        return
    try:
        compile_re2(regex)
    except re.error as e:
        c.err(path, f"invalid regex {regex!r}: {e}; Istio uses RE2 style regex-based match")


def check_string_match(c: Checker, path: str, sm: StringMatch | None, *, kind: str = "") -> None:
    if sm is None:
        return
    set_ = [n for n in ("exact", "prefix", "regex") if getattr(sm, n) is not None]
    if len(set_) > 1:
        c.err(path, f"only one of exact, prefix or regex may be set (got {', '.join(set_)})")
    if sm.regex is not None:
        check_regex(c, f"{path}.regex", sm.regex)
    if kind == "uri" and sm.prefix == "":
        c.err(f"{path}.prefix", "prefix string match should not be empty")


def check_header_name(c: Checker, path: str, name: str) -> None:
    if name == "":
        c.err(path, "header name cannot be empty")
    elif not _HEADER_NAME.match(name):
        c.err(path, f"header name {name} is not a valid header name")


def _is_internal(name: str) -> bool:
    return name.startswith(":") or name.lower() == "host"


def _is_authority(name: str) -> bool:
    return name.lower() in (":authority", "host")


def check_headers(c: Checker, path: str, h: Headers | None) -> None:
    if h is None:
        return
    for side in ("request", "response"):
        ops = getattr(h, side)
        if ops is None:
            continue
        base = f"{path}.{side}"
        for op in ("set", "add"):
            for name, val in getattr(ops, op).items():
                p = f"{base}.{op}.{name}"
                if name == "":
                    c.err(p, "header name cannot be empty")
                elif side == "request" and _is_internal(name) and not _is_authority(name):
                    c.err(p, f'invalid header "{name}": header cannot have ":" prefix')
                elif side == "response" and name.lower() == "host":
                    c.err(p, f'invalid header "{name}": cannot set Host header')
                elif side == "response" and _is_internal(name):
                    c.err(p, f'invalid header "{name}": header cannot have ":" prefix')
                if _BAD_HEADER_VALUE.search(val):
                    c.err(p, f"header value configuration {val!r} is invalid")
        for i, name in enumerate(ops.remove):
            p = f"{base}.remove[{i}]"
            if name == "":
                c.err(p, "header name cannot be empty")
            elif name.lower() == "host":
                c.err(p, f'invalid header "{name}": cannot set Host header')
            elif _is_internal(name):
                c.err(p, f'invalid header "{name}": header cannot have ":" prefix')


def check_gateway_names(c: Checker, path: str, names: tuple[str, ...]) -> None:
    for i, g in enumerate(names):
        p = f"{path}[{i}]"
        ns, slash, name = g.partition("/")
        if not slash:
            if "." in g:
                parts = g.split(".")
                c.warn(
                    p,
                    f"using legacy gatewayName format {g!r}; prefer the <namespace>/<name> "
                    f"format: {parts[1]}/{parts[0]!r}",
                )
            err = H.check_fqdn(g)
            if err:
                c.err(p, err)
            continue
        if not ns or not name:
            c.err(p, "config namespace and gateway name cannot be empty")
            continue
        if not H.is_dns1123_label(ns):
            c.err(p, f"invalid value for namespace: {ns!r}")
        if not H.is_dns1123_label(name):
            c.err(p, f"invalid value for gateway name: {name!r}")


def check_destination(c: Checker, path: str, d: Destination | None, *, required: bool) -> None:
    if d is None:
        if required:
            c.err(path, "destination is required")
        return
    if d.host is None or d.host == "":
        c.err(f"{path}.host", "destination host is required")
    elif d.host == "*":
        c.err(f"{path}.host", f"invalid destination host {d.host}")
    else:
        err = H.check_wildcard_domain(d.host)
        if err:
            c.err(f"{path}.host", err)
    if d.subset is not None:
        if d.subset == "":
            c.err(f"{path}.subset", "subset name cannot be empty")
        elif not H.is_dns1123_label(d.subset):
            c.err(f"{path}.subset", f"subset name is invalid: {d.subset}")
    if d.port is not None:
        check_port(c, f"{path}.port.number", d.port.number or 0)


def check_weights(
    c: Checker, path: str, dests: tuple[HTTPRouteDestination, ...] | tuple[RouteDestination, ...]
) -> None:
    total = 0
    for i, rd in enumerate(dests):
        p = f"{path}[{i}]"
        check_destination(c, f"{p}.destination", rd.destination, required=True)
        if isinstance(rd, HTTPRouteDestination):
            check_headers(c, f"{p}.headers", rd.headers)
        if rd.weight is not None:
            if rd.weight < 0:
                c.err(f"{p}.weight", "must be >= 0")
            else:
                total += rd.weight
    if len(dests) > 1 and total == 0:
        c.err(path, "total destination weight = 0 (must be > 0)")


# --------------------------------------------------------------------------- VirtualService


def check_virtual_service(c: Checker, ns: str, vs: VirtualServiceSpec) -> None:
    delegate = not vs.hosts
    if delegate:
        if vs.gateways:
            c.err("spec.gateways", "delegate virtual service must have no gateways specified")
        if vs.tls:
            c.err("spec.tls", "delegate virtual service must have no tls route specified")
        if vs.tcp:
            c.err("spec.tcp", "delegate virtual service must have no tcp route specified")
    applies_to_mesh = not vs.gateways or "mesh" in vs.gateways
    if vs.gateways:
        check_gateway_names(c, "spec.gateways", vs.gateways)
    all_valid = True
    for i, h in enumerate(vs.hosts):
        p = f"spec.hosts[{i}]"
        err = H.check_wildcard_domain(h)
        if err:
            if not H.is_ip(h):
                c.err(p, err)
                all_valid = False
        elif applies_to_mesh and h == "*":
            c.err(
                p, "wildcard host * is not allowed for virtual services bound to the mesh gateway"
            )
            all_valid = False
    if all_valid:
        expanded = [H.expand(h, ns) for h in vs.hosts]
        for i in range(len(expanded)):
            for j in range(i + 1, len(expanded)):
                if H.hosts_overlap(expanded[i], expanded[j]):
                    c.err(
                        f"spec.hosts[{j}]",
                        f"duplicate hosts in virtual service: {vs.hosts[i]} & {vs.hosts[j]}",
                    )
    if not vs.http and not vs.tcp and not vs.tls:
        c.err("spec", "http, tcp or tls must be provided in virtual service")
    for i, r in enumerate(vs.http):
        _check_http_route_memo(c, f"spec.http[{i}]", r, delegate)
    _warn_unreachable(c, vs.http)
    for i, t in enumerate(vs.tls):
        p = f"spec.tls[{i}]"
        if not t.match:
            c.err(p, "TLS route must have at least one match condition")
        for j, m in enumerate(t.match):
            mp = f"{p}.match[{j}]"
            if not m.sni_hosts:
                c.err(mp, "TLS match must have at least one SNI host")
            for k, sni in enumerate(m.sni_hosts):
                _check_sni(c, f"{mp}.sniHosts[{k}]", sni, vs, ns)
            _check_l4_match(c, mp, m)
        if not t.route:
            c.err(p, "TLS route is required")
        check_weights(c, f"{p}.route", t.route)
    for i, t in enumerate(vs.tcp):
        p = f"spec.tcp[{i}]"
        for j, m in enumerate(t.match):
            mp = f"{p}.match[{j}]"
            _check_l4_match(c, mp, m)
        if not t.route:
            c.err(p, "TCP route is required")
        check_weights(c, f"{p}.route", t.route)
    check_export_to(c, "spec.exportTo", ns, vs.export_to)


def _check_l4_match(c: Checker, mp: str, m: L4MatchAttributes | TLSMatchAttributes) -> None:
    """The attributes a TLS match shares with a TCP match."""
    for k, sn in enumerate(m.destination_subnets):
        err = H.check_ip_subnet(sn)
        if err:
            c.err(f"{mp}.destinationSubnets[{k}]", err)
    check_port(c, f"{mp}.port", m.port)
    check_labels(c, f"{mp}.sourceLabels", m.source_labels)
    check_gateway_names(c, f"{mp}.gateways", m.gateways)


def _check_mirror_percentage(c: Checker, path: str, what: str, pct: Percent | None) -> None:
    """0 <= value <= 100; ``what`` names it as Istio's message does for that field."""
    if pct is None or pct.value is None:
        return
    v = pct.value
    if v > 100:
        c.err(path, f"{what} must have a max value of 100 (it has {v:g})")
    if v < 0:
        c.err(path, f"{what} must have a min value of 0 (it has {v:g})")


def _check_sni(c: Checker, path: str, sni: str, vs: VirtualServiceSpec, ns: str) -> None:
    err = H.check_wildcard_domain(sni)
    if err:
        if H.is_ip(sni):
            c.warn(path, f"using an IP address ({sni!r}) goes against SNI spec")
            return
        c.err(path, err)
        return
    s = H.expand(sni, ns)
    for h in vs.hosts:
        hh = H.expand(h, ns)
        if s == hh or H.wildcard_matches(hh, s):
            return
    c.err(
        path,
        f"SNI host {sni!r} is not a compatible subset of any of the virtual service hosts: "
        f"[{', '.join(vs.hosts)}]",
    )


def _warn_unreachable(c: Checker, routes: tuple[HTTPRoute, ...]) -> None:
    catch_all = -1
    for i, r in enumerate(routes):
        if not r.match:
            if catch_all >= 0:
                c.warn(
                    f"spec.http[{i}]",
                    f"virtualService rule #{i} not used (only the last rule can have no matches)",
                )
            catch_all = i


class _Recorder(Checker):
    """A :class:`Checker` that keeps its findings, to be replayed under another path."""

    __slots__ = ("found",)

    def __init__(self) -> None:
        super().__init__("", "", ValidationReport())
        self.found: list[tuple[bool, str, str]] = []

    def err(self, path: str, msg: str) -> None:
        self.found.append((True, path, msg))

    def warn(self, path: str, msg: str) -> None:
        self.found.append((False, path, msg))


_HERE = "\x00"  # stands for the rule's path while its findings are recorded
_RULE_FINDINGS: dict[tuple[int, bool], tuple[HTTPRoute, tuple[tuple[bool, str, str], ...]]] = {}
_RULE_FINDINGS_MAX = 8192


def _check_http_route_memo(c: Checker, p: str, r: HTTPRoute, delegate: bool) -> None:
    """:func:`check_http_route`, memoized by the rule object: the decoder shares one object
    between equal rules (see ``schema.MEMOIZED``), and a rule's findings depend on nothing
    else, so a config repeating the same rule checks it once and replays the lines."""
    key = (id(r), delegate)
    hit = _RULE_FINDINGS.get(key)
    if hit is None or hit[0] is not r:
        rec = _Recorder()
        check_http_route(rec, _HERE, r, delegate)
        if not all(path.startswith(_HERE) for _, path, _ in rec.found):
            check_http_route(c, p, r, delegate)  # not replayable: check in place
            return
        if len(_RULE_FINDINGS) >= _RULE_FINDINGS_MAX:
            _RULE_FINDINGS.clear()
        hit = _RULE_FINDINGS[key] = (r, tuple(rec.found))
    for is_err, path, msg in hit[1]:
        if is_err:
            c.err(p + path[1:], msg)
        else:
            c.warn(p + path[1:], msg)


def check_http_route(c: Checker, p: str, r: HTTPRoute, delegate: bool) -> None:
    if r.delegate is not None and not delegate:
        if r.redirect is not None:
            c.err(p, "root HTTP route must not specify redirect")
        if r.route:
            c.err(p, "root HTTP route must not specify route")
        if r.direct_response is not None:
            c.err(p, "root HTTP route must not specify directResponse")
        if not r.delegate.name:
            c.err(f"{p}.delegate.name", "delegate name is required")
        elif not H.is_subdomain(r.delegate.name):
            c.err(f"{p}.delegate.name", f"invalid delegate name {r.delegate.name!r}")
        if r.delegate.namespace and not H.is_dns1123_label(r.delegate.namespace):
            c.err(f"{p}.delegate.namespace", f"invalid namespace {r.delegate.namespace!r}")
    else:
        if delegate and r.delegate is not None:
            c.err(f"{p}.delegate", "delegate HTTP route cannot contain delegate")
        if r.direct_response is not None:
            if r.route:
                c.err(p, "HTTP route cannot contain both route and directResponse")
            if r.redirect is not None:
                c.err(p, "HTTP route cannot contain both redirect and directResponse")
        if r.redirect is not None:
            if r.route:
                c.err(p, "HTTP route cannot contain both route and redirect")
            if r.fault is not None:
                c.err(p, "HTTP route cannot contain both fault and redirect")
            if r.rewrite is not None:
                c.err(p, "HTTP route rule cannot contain both rewrite and redirect")
        elif not r.route and r.direct_response is None:
            c.err(p, "HTTP route, redirect or directResponse is required")
    for j, m in enumerate(r.match):
        _check_match(c, f"{p}.match[{j}]", m)
    check_headers(c, f"{p}.headers", r.headers)
    _check_cors(c, f"{p}.corsPolicy", r.cors_policy)
    _check_fault(c, f"{p}.fault", r.fault)
    if r.mirror_percent is not None:
        if r.mirror_percent > 100 or r.mirror_percent < 0:
            c.err(
                f"{p}.mirrorPercent",
                f"mirror_percent must have a value in 0..100 (it has {r.mirror_percent})",
            )
        c.warn(
            f"{p}.mirrorPercent", 'using deprecated setting "mirrorPercent", use "mirrorPercentage"'
        )
    _check_mirror_percentage(
        c, f"{p}.mirrorPercentage.value", "mirror_percentage", r.mirror_percentage
    )
    if r.mirror is not None:
        check_destination(c, f"{p}.mirror", r.mirror, required=True)
        if r.mirrors:
            c.err(p, "cannot specify both mirror and mirrors")
    for i, m in enumerate(r.mirrors):
        mp = f"{p}.mirrors[{i}]"
        check_destination(c, f"{mp}.destination", m.destination, required=True)
        _check_mirror_percentage(c, f"{mp}.percentage.value", "mirror percentage", m.percentage)
    _check_redirect(c, f"{p}.redirect", r)
    _check_direct_response(c, f"{p}.directResponse", r)
    _check_retries(c, f"{p}.retries", r)
    _check_rewrite(c, f"{p}.rewrite", r)
    check_weights(c, f"{p}.route", r.route)
    if r.timeout is not None and r.timeout != 0:
        check_duration(c, f"{p}.timeout", r.timeout)
    if r.websocket_upgrade is not None:
        c.warn(
            f"{p}.websocketUpgrade",
            "deprecated field ignored (WebSocket upgrades are always allowed)",
        )


def _check_match(c: Checker, mp: str, m: HTTPMatchRequest) -> None:
    for name, sm in m.headers.items():
        check_header_name(c, f"{mp}.headers.{name}", name)
        check_string_match(c, f"{mp}.headers.{name}", sm)
    for name, sm in m.without_headers.items():
        check_header_name(c, f"{mp}.withoutHeaders.{name}", name)
        check_string_match(c, f"{mp}.withoutHeaders.{name}", sm)
    for name, sm in m.query_params.items():
        check_string_match(c, f"{mp}.queryParams.{name}", sm)
    check_string_match(c, f"{mp}.uri", m.uri, kind="uri")
    check_string_match(c, f"{mp}.scheme", m.scheme)
    check_string_match(c, f"{mp}.method", m.method)
    check_string_match(c, f"{mp}.authority", m.authority)
    check_port(c, f"{mp}.port", m.port)
    check_labels(c, f"{mp}.sourceLabels", m.source_labels)
    check_gateway_names(c, f"{mp}.gateways", m.gateways)
    if m.source_namespace is not None and not H.is_dns1123_label(m.source_namespace):
        c.err(f"{mp}.sourceNamespace", f"sourceNamespace match {m.source_namespace} is invalid")


def _check_cors(c: Checker, p: str, cp: CorsPolicy | None) -> None:
    if cp is None:
        return
    for i, o in enumerate(cp.allow_origins):
        op = f"{p}.allowOrigins[{i}]"
        val = o.exact if o.exact is not None else o.prefix if o.prefix is not None else o.regex
        if not val:
            c.err(op, "'' is not a valid match type for CORS allow origins")
        else:
            check_string_match(c, op, o)
    for i, meth in enumerate(cp.allow_methods):
        if meth not in SUPPORTED_METHODS:
            c.err(f"{p}.allowMethods[{i}]", f"{meth!r} is not a supported HTTP method")
    for fname, names in (("allowHeaders", cp.allow_headers), ("exposeHeaders", cp.expose_headers)):
        for i, n in enumerate(names):
            if n != "*":
                check_header_name(c, f"{p}.{fname}[{i}]", n)
    if cp.max_age is not None:
        check_duration(c, f"{p}.maxAge", cp.max_age)
        if abs(cp.max_age - round(cp.max_age)) > 1e-9:
            c.err(f"{p}.maxAge", "max_age duration is accurate only to seconds precision")
    if cp.allow_origin:
        c.warn(f"{p}.allowOrigin", 'deprecated, use "allowOrigins"')
    c.warn(p, "corsPolicy is validated but not enforced by meshproxy")


def _check_fault(c: Checker, p: str, f: HTTPFaultInjection | None) -> None:
    if f is None:
        return
    if f.abort is None and f.delay is None:
        c.err(p, "HTTP fault injection must have an abort and/or a delay")
    if f.abort is not None:
        a = f.abort
        ap = f"{p}.abort"
        check_percentage(c, f"{ap}.percentage", a.percentage)
        kinds = [
            n
            for n, v in (
                ("httpStatus", a.http_status),
                ("grpcStatus", a.grpc_status),
                ("http2Error", a.http2_error),
            )
            if v is not None
        ]
        if len(kinds) > 1:
            c.err(
                ap,
                f"only one of httpStatus, grpcStatus or http2Error may be set (got {', '.join(kinds)})",
            )
        if a.http_status is not None and not 200 <= a.http_status <= 599:
            c.err(f"{ap}.httpStatus", f"HTTP status {a.http_status} is not in range 200-599")
        if a.grpc_status is not None:
            if a.grpc_status not in GRPC_STATUS:
                c.err(f"{ap}.grpcStatus", f"gRPC status {a.grpc_status!r} is not supported")
            else:
                c.warn(
                    f"{ap}.grpcStatus",
                    "gRPC aborts are not supported by meshproxy (HTTP/1 only); ignored",
                )
        if a.http2_error is not None:
            c.err(f"{ap}.http2Error", "HTTP/2 abort fault injection not supported yet")
        if not kinds:
            c.warn(ap, "abort configured, but error type not set")
    if f.delay is not None:
        d = f.delay
        dp = f"{p}.delay"
        check_percentage(c, f"{dp}.percentage", d.percentage)
        check_percent_int(c, f"{dp}.percent", d.percent)
        if d.fixed_delay is not None:
            check_duration(c, f"{dp}.fixedDelay", d.fixed_delay)
        if d.exponential_delay is not None:
            check_duration(c, f"{dp}.exponentialDelay", d.exponential_delay)
            c.err(f"{dp}.exponentialDelay", "exponentialDelay not supported yet")
        if d.fixed_delay is not None and d.exponential_delay is not None:
            c.err(dp, "only one of fixedDelay or exponentialDelay may be set")
        if d.fixed_delay is None and d.exponential_delay is None:
            c.err(dp, "delay must specify fixedDelay")


def _check_redirect(c: Checker, p: str, r: HTTPRoute) -> None:
    rd = r.redirect
    if rd is None:
        return
    if (
        not rd.uri
        and not rd.authority
        and rd.port is None
        and rd.derive_port is None
        and not rd.scheme
    ):
        c.err(p, "redirect must specify URI, authority, scheme, or port")
    if (
        rd.redirect_code is not None
        and rd.redirect_code != 0
        and not 300 <= rd.redirect_code <= 399
    ):
        c.err(f"{p}.redirectCode", f"{rd.redirect_code} is not a valid redirect code, must be 3xx")
    if rd.scheme and rd.scheme not in ("http", "https"):
        c.err(f"{p}.scheme", 'invalid redirect scheme, must be "http" or "https"')
    if rd.port is not None:
        check_port(c, f"{p}.port", rd.port)
        if rd.derive_port is not None:
            c.err(p, "only one of port or derivePort may be set")


def _check_direct_response(c: Checker, p: str, r: HTTPRoute) -> None:
    dr = r.direct_response
    if dr is None:
        return
    if dr.status is None:
        c.err(f"{p}.status", "status is required")
    elif not 200 <= dr.status <= 599:
        c.err(f"{p}.status", f"HTTP status {dr.status} is not in range 200-599")
    if dr.body is not None:
        b = dr.body
        size = 0
        if b.string is not None and b.bytes is not None:
            c.err(f"{p}.body", "only one of string or bytes may be set")
        if b.string is not None:
            size = len(b.string.encode())
        elif b.bytes is not None:
            try:
                size = len(base64.b64decode(b.bytes, validate=True))
            except (binascii.Error, ValueError):
                c.err(f"{p}.body.bytes", "must be base64-encoded")
        if size > 1024 * 1024:
            c.err(
                f"{p}.body",
                "large direct_responses may impact control plane performance, must be less than 1MB",
            )
        elif size > 100 * 1024:
            c.warn(f"{p}.body", "large direct_responses may impact control plane performance")


def _check_retries(c: Checker, p: str, r: HTTPRoute) -> None:
    rt = r.retries
    if rt is None:
        return
    attempts = rt.attempts or 0
    if attempts < 0:
        c.err(f"{p}.attempts", "attempts cannot be negative")
    # Istio validateHTTPRetry tests `RetryOn != ""`: an empty retryOn is the same as none
    if attempts == 0 and (
        rt.per_try_timeout is not None or rt.retry_on or rt.retry_remote_localities is not None
    ):
        c.err(p, "http retry policy configured when attempts are set to 0 (disabled)")
    check_duration(c, f"{p}.perTryTimeout", rt.per_try_timeout)
    check_duration(c, f"{p}.backoff", rt.backoff)
    if rt.retry_on:
        for policy in rt.retry_on.split(","):
            code = int(policy) if policy.isdigit() else 0
            if code not in KNOWN_STATUS and policy not in RETRY_ON_POLICIES:
                c.err(f"{p}.retryOn", f"{policy!r} is not a valid retryOn policy")


def _check_rewrite(c: Checker, p: str, r: HTTPRoute) -> None:
    rw = r.rewrite
    if rw is None:
        return
    if rw.uri and rw.uri_regex_rewrite is not None:
        c.err(p, "rewrite may only contain one of URI or UriRegexRewrite")
    if not rw.uri and rw.uri_regex_rewrite is None and not rw.authority:
        c.err(p, "rewrite must specify at least one of URI, UriRegexRewrite, or authority")
    rr = rw.uri_regex_rewrite
    if rr is not None:
        if not rr.match or rr.rewrite is None or rr.rewrite == "":
            c.err(
                f"{p}.uriRegexRewrite",
                "UriRegexRewrite requires both Rewrite and Match fields to be specified",
            )
        if rr.match:
            check_regex(c, f"{p}.uriRegexRewrite.match", rr.match)
    current = rw.authority or ""
    req = r.headers.request if r.headers is not None else None
    if req is not None:
        for op in (req.set, req.add):
            for k, v in op.items():
                if _is_authority(k):
                    if current:
                        c.err(
                            f"{p}.authority" if rw.authority else f"spec.headers.request.{k}",
                            f"authority header cannot be set multiple times: have {current!r}, attempting to set {v!r}",
                        )
                    current = v


# --------------------------------------------------------------------------- DestinationRule


def check_destination_rule(c: Checker, ns: str, dr: DestinationRuleSpec) -> None:
    if dr.host is None:
        c.err("spec.host", "host is required")
    else:
        err = H.check_wildcard_domain(dr.host)
        if err:
            c.err("spec.host", err)
    check_traffic_policy(c, "spec.trafficPolicy", dr.traffic_policy)
    seen: set[str] = set()
    for i, s in enumerate(dr.subsets):
        p = f"spec.subsets[{i}]"
        if not s.name:
            c.err(f"{p}.name", "subset name cannot be empty")
        else:
            if s.name in seen:
                c.err(f"{p}.name", f"duplicate subset names: {s.name}")
            seen.add(s.name)
            if not H.is_dns1123_label(s.name):
                c.err(f"{p}.name", f"subset name is invalid: {s.name}")
        check_labels(c, f"{p}.labels", s.labels)
        check_traffic_policy(c, f"{p}.trafficPolicy", s.traffic_policy)
    check_export_to(c, "spec.exportTo", ns, dr.export_to)
    if dr.workload_selector is not None:
        _check_ws(c, "spec.workloadSelector", dr.workload_selector)
        ex = {ns if e == "." else e for e in dr.export_to}
        if ex and ns not in ex:
            c.err(
                "spec.exportTo",
                "destination rule with workload selector cannot have exportTo beyond current namespace",
            )
        elif len(ex) > 1:
            c.err(
                "spec.exportTo",
                "destination rule with workload selector cannot have multiple entries in exportTo",
            )


def _check_ws(c: Checker, p: str, ws: WorkloadSelector) -> None:
    check_selector_labels(c, f"{p}.matchLabels", ws.match_labels, "it applies to every workload")


def check_traffic_policy(c: Checker, p: str, tp: TrafficPolicy | None) -> None:
    if tp is None:
        return
    if (
        tp.outlier_detection is None
        and tp.connection_pool is None
        and tp.load_balancer is None
        and tp.tls is None
        and not tp.port_level_settings
        and tp.tunnel is None
        and tp.proxy_protocol is None
        # a policy with only a retryBudget is valid (istio/istio#57322)
        and tp.retry_budget is None
    ):
        c.err(p, "traffic policy must have at least one field")
        return
    if tp.tunnel is not None and tp.proxy_protocol is not None:
        c.err(p, "tunnel and proxyProtocol must not be set together")
    _check_retry_budget(c, f"{p}.retryBudget", tp.retry_budget)
    _check_outlier(c, f"{p}.outlierDetection", tp.outlier_detection)
    _check_pool(c, f"{p}.connectionPool", tp.connection_pool)
    _check_lb(c, f"{p}.loadBalancer", tp.load_balancer, tp.outlier_detection)
    _check_tls(c, f"{p}.tls", tp.tls)
    ports: set[int] = set()
    for i, pl in enumerate(tp.port_level_settings):
        pp = f"{p}.portLevelSettings[{i}]"
        if pl.port is None or pl.port.number is None:
            c.err(f"{pp}.port", "portTrafficPolicy must have valid port")
        else:
            check_port(c, f"{pp}.port.number", pl.port.number)
            if pl.port.number in ports:
                c.err(
                    f"{pp}.port.number", f"duplicate port level setting for port {pl.port.number}"
                )
            ports.add(pl.port.number)
        if (
            pl.outlier_detection is None
            and pl.connection_pool is None
            and pl.load_balancer is None
            and pl.tls is None
        ):
            c.err(pp, "port traffic policy must have at least one field")
        else:
            _check_outlier(c, f"{pp}.outlierDetection", pl.outlier_detection)
            _check_pool(c, f"{pp}.connectionPool", pl.connection_pool)
            _check_lb(c, f"{pp}.loadBalancer", pl.load_balancer, pl.outlier_detection)
            _check_tls(c, f"{pp}.tls", pl.tls)
    if tp.tunnel is not None:
        t = tp.tunnel
        tp_ = f"{p}.tunnel"
        if t.protocol and t.protocol not in ("CONNECT", "POST"):
            c.err(f"{tp_}.protocol", 'tunnel protocol must be "CONNECT" or "POST"')
        host = t.target_host or ""
        if H.check_fqdn(host) and not H.is_ip(host):
            c.err(
                f"{tp_}.targetHost",
                f"tunnel target host must be valid FQDN or IP address: {host!r}",
            )
        if t.target_port is None or not 1 <= t.target_port <= 65535:
            c.err(f"{tp_}.targetPort", f"tunnel target port is invalid: {t.target_port}")
        c.warn(tp_, "tunnel settings are validated but not used by meshproxy")
    if tp.proxy_protocol is not None:
        c.warn(f"{p}.proxyProtocol", "proxyProtocol is validated but not used by meshproxy")


def _check_retry_budget(c: Checker, p: str, rb: RetryBudget | None) -> None:
    """``TrafficPolicy.retryBudget``: ``percent`` is bounded 0..100 by the CRD schema
    (``+kubebuilder:validation:Minimum=0`` / ``Maximum=100`` in destination_rule.proto),
    ``minRetryConcurrency`` is a uint32. ``budgetInterval`` (Envoy's ``budget_interval``)
    defaults to 0ms, the concurrent form: 0 is valid, a window is accepted but not applied."""
    if rb is None:
        return
    if rb.percent is not None and not 0.0 <= rb.percent <= 100.0:
        c.err(f"{p}.percent", f"retry budget percent {rb.percent:g} is not in range 0..100")
    if rb.min_retry_concurrency is not None and rb.min_retry_concurrency < 0:
        c.err(f"{p}.minRetryConcurrency", "min retry concurrency must be non-negative")
    bi = rb.budget_interval
    if bi is not None:
        if bi < 0:
            c.err(f"{p}.budgetInterval", "budget interval must not be negative")
        elif bi > 0:
            check_duration(c, f"{p}.budgetInterval", bi)
            c.warn(
                f"{p}.budgetInterval",
                "accepted but not applied: meshproxy's retry budget counts only active and "
                "pending requests (Envoy's budgetInterval 0ms form)",
            )


def _check_outlier(c: Checker, p: str, o: OutlierDetection | None) -> None:
    if o is None:
        return
    check_duration(c, f"{p}.baseEjectionTime", o.base_ejection_time)
    check_duration(c, f"{p}.interval", o.interval)
    if o.consecutive_errors is not None and o.consecutive_errors != 0:
        c.warn(
            f"{p}.consecutiveErrors",
            "outlier detection consecutive errors is deprecated, use consecutiveGatewayErrors or consecutive5xxErrors instead",
        )
    for fname, v in (
        ("consecutiveErrors", o.consecutive_errors),
        ("consecutive5xxErrors", o.consecutive_5xx_errors),
        ("consecutiveGatewayErrors", o.consecutive_gateway_errors),
        ("consecutiveLocalOriginFailures", o.consecutive_local_origin_failures),
    ):
        if v is not None and v < 0:
            c.err(f"{p}.{fname}", "must be >= 0")
    if not o.split_external_local_origin_errors and (o.consecutive_local_origin_failures or 0) > 0:
        c.err(
            f"{p}.consecutiveLocalOriginFailures",
            "outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false",
        )
    check_percent_int(c, f"{p}.maxEjectionPercent", o.max_ejection_percent)
    check_percent_int(c, f"{p}.minHealthPercent", o.min_health_percent)


def _check_pool(c: Checker, p: str, cp: ConnectionPoolSettings | None) -> None:
    if cp is None:
        return
    if cp.http is None and cp.tcp is None:
        c.err(p, "connection pool must have at least one field")
        return
    if cp.http is not None:
        h = cp.http
        hp = f"{p}.http"
        for fname, v, what in (
            ("http1MaxPendingRequests", h.http1_max_pending_requests, "http1 max pending requests"),
            ("http2MaxRequests", h.http2_max_requests, "http2 max requests"),
            (
                "maxRequestsPerConnection",
                h.max_requests_per_connection,
                "max requests per connection",
            ),
            ("maxRetries", h.max_retries, "max retries"),
            ("maxConcurrentStreams", h.max_concurrent_streams, "max concurrent streams"),
        ):
            if v is not None and v < 0:
                c.err(f"{hp}.{fname}", f"{what} must be non-negative")
        check_duration(c, f"{hp}.idleTimeout", h.idle_timeout)
        if h.h2_upgrade_policy == "UPGRADE" and h.use_client_protocol:
            c.err(hp, "use client protocol must not be true when H2UpgradePolicy is UPGRADE")
        # meshproxy speaks HTTP/1.1 upstream, which is what DEFAULT / DO_NOT_UPGRADE and
        # useClientProtocol (downstream is HTTP/1) give in Istio; the HTTP/2-only knobs are not
        if h.h2_upgrade_policy == "UPGRADE":
            c.warn(
                f"{hp}.h2UpgradePolicy",
                "accepted but not applied: meshproxy does not upgrade upstream connections to HTTP/2",
            )
        if h.max_concurrent_streams:
            c.warn(
                f"{hp}.maxConcurrentStreams",
                "accepted but not applied: it limits HTTP/2 streams and meshproxy's upstreams are HTTP/1.1",
            )
    if cp.tcp is not None:
        t = cp.tcp
        tp = f"{p}.tcp"
        if t.max_connections is not None and t.max_connections < 0:
            c.err(f"{tp}.maxConnections", "max connections must be non-negative")
        check_duration(c, f"{tp}.connectTimeout", t.connect_timeout)
        check_duration(c, f"{tp}.maxConnectionDuration", t.max_connection_duration)
        check_duration(c, f"{tp}.idleTimeout", t.idle_timeout)
        if t.max_connection_duration is not None:
            c.warn(
                f"{tp}.maxConnectionDuration",
                "accepted but not applied: meshproxy does not close upstream connections by age",
            )
        if t.tcp_keepalive is not None:
            check_duration(c, f"{tp}.tcpKeepalive.time", t.tcp_keepalive.time)
            check_duration(c, f"{tp}.tcpKeepalive.interval", t.tcp_keepalive.interval)
            c.warn(
                f"{tp}.tcpKeepalive",
                "accepted but not applied: meshproxy sets no TCP keepalive on upstream sockets",
            )


def _is_prime(x: int) -> bool:
    if 0 < x < 4:
        return True
    if x % 2 == 0:
        return False
    f = 3
    while f * f <= x:
        if x % f == 0:
            return False
        f += 2
    return True


def _check_lb(
    c: Checker, p: str, lb: LoadBalancerSettings | None, outlier: OutlierDetection | None
) -> None:
    if lb is None:
        return
    if lb.simple is not None and lb.consistent_hash is not None:
        c.err(p, "only one of simple or consistentHash may be set")
    ch = lb.consistent_hash
    if ch is not None:
        cp = f"{p}.consistentHash"
        keys = [
            n
            for n, v in (
                ("httpHeaderName", ch.http_header_name),
                ("httpCookie", ch.http_cookie),
                ("useSourceIp", ch.use_source_ip),
                ("httpQueryParameterName", ch.http_query_parameter_name),
            )
            if v is not None
        ]
        if len(keys) > 1:
            c.err(cp, f"only one hash key may be set (got {', '.join(keys)})")
        if not keys:
            c.err(
                cp,
                "one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required",
            )
        if ch.http_header_name is not None:
            check_header_name(c, f"{cp}.httpHeaderName", ch.http_header_name)
        if ch.http_cookie is not None:
            if not ch.http_cookie.name:
                c.err(f"{cp}.httpCookie.name", "name required for HttpCookie")
            if ch.http_cookie.ttl is not None and ch.http_cookie.ttl < 0:
                c.err(f"{cp}.httpCookie.ttl", "ttl must be >= 0")
        if ch.minimum_ring_size is not None and ch.minimum_ring_size != 0:
            c.warn(
                f"{cp}.minimumRingSize",
                "consistent hash MinimumRingSize is deprecated, use ConsistentHashLB's RingHash configuration instead",
            )
            if ch.ring_hash is not None or ch.maglev is not None:
                c.err(cp, "only one of MinimumRingSize or Maglev/Ringhash can be specified")
        if ch.ring_hash is not None and ch.maglev is not None:
            c.err(cp, "only one of ringHash or maglev can be specified")
        if ch.maglev is not None:
            ts = ch.maglev.table_size or 0
            mp = f"{cp}.maglev.tableSize"
            if ts == 0:
                c.err(mp, "tableSize must be set for maglev")
            elif ts >= 5000011:
                c.err(mp, "tableSize must be less than 5000011 for maglev")
            elif not _is_prime(ts):
                c.err(mp, "tableSize must be a prime number for maglev")
    loc = lb.locality_lb_setting
    if loc is not None:
        lp = f"{p}.localityLbSetting"
        if loc.distribute and loc.failover:
            c.err(lp, "can not simultaneously specify 'distribute' and 'failover'")
        if loc.failover and loc.failover_priority:
            pass
        for i, d in enumerate(loc.distribute):
            total = sum(d.to.values())
            if total != 100:
                c.err(f"{lp}.distribute[{i}].to", f"total weight {total} != 100")
        for i, f in enumerate(loc.failover):
            if f.from_ is not None and f.from_ == f.to:
                c.err(
                    f"{lp}.failover[{i}]",
                    "locality lb failover settings must specify different regions",
                )
            if (f.from_ and "/" in f.from_) or (f.to and "/" in f.to):
                c.err(f"{lp}.failover[{i}]", "locality lb failover only specify region")
        if (loc.failover or loc.failover_priority) and outlier is None:
            c.warn(lp, "outlier detection policy must be provided for failover")
        c.warn(lp, "localityLbSetting is validated but locality-aware balancing is not implemented")
    check_duration(c, f"{p}.warmupDurationSecs", lb.warmup_duration_secs)
    if lb.warmup is not None:
        check_duration(c, f"{p}.warmup.duration", lb.warmup.duration)


def _check_tls(c: Checker, p: str, t: ClientTLSSettings | None) -> None:
    if t is None:
        return
    mode = t.mode or "DISABLE"
    if t.insecure_skip_verify:
        if mode == "SIMPLE" and (t.ca_certificates or t.credential_name or t.subject_alt_names):
            c.err(
                p,
                "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true",
            )
        if mode == "MUTUAL" and (t.ca_certificates or t.subject_alt_names):
            c.err(
                p,
                "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true",
            )
    if mode in ("SIMPLE", "MUTUAL") and t.credential_name:
        if t.client_certificate or t.ca_certificates or t.private_key or t.ca_crl:
            c.err(
                p,
                "cannot specify client certificates or CA certificate or CA CRL If credentialName is set",
            )
        return
    if mode == "MUTUAL":
        if not t.client_certificate:
            c.err(f"{p}.clientCertificate", "client certificate required for mutual tls")
        if not t.private_key:
            c.err(f"{p}.privateKey", "private key required for mutual tls")
    if mode == "ISTIO_MUTUAL" and (
        t.client_certificate or t.private_key or t.ca_certificates or t.credential_name
    ):
        c.err(p, "cannot specify client certificates or CA certificate If tls mode is ISTIO_MUTUAL")


# --------------------------------------------------------------------------- ServiceEntry / WorkloadEntry


def check_workload_entry(
    c: Checker, p: str, we: WorkloadEntrySpec, service_ports: set[str] | None, allow_fqdn: bool
) -> None:
    addr = we.address or ""
    unix = False
    if not addr:
        if not we.network:
            c.err(f"{p}.address", "address is required")
        else:
            c.warn(f"{p}.address", f"address is unset with network {we.network!r}")
    if addr.startswith("unix://"):
        unix = True
        path = addr[len("unix://") :]
        if not path:
            c.err(f"{p}.address", "unix address must not be empty")
        elif not path.startswith("@") and (not path.startswith("/") or path.endswith("/")):
            c.err(f"{p}.address", f"{path} is not an absolute path to a file")
        if we.ports:
            c.err(f"{p}.ports", f"unix endpoint {addr} must not include ports")
    elif addr and not H.is_ip(addr):
        if not allow_fqdn:
            c.err(f"{p}.address", f"endpoint address {addr!r} is not a valid IP address")
        elif H.check_fqdn(addr):
            c.err(f"{p}.address", f"endpoint address {addr!r} is not a valid FQDN or an IP address")
    for name, port in we.ports.items():
        pp = f"{p}.ports.{name}"
        if service_ports is not None and name not in service_ports:
            c.err(pp, f"endpoint port {port} is not defined by the service entry")
        if not H.is_dns1123_label(name):
            c.err(pp, f"invalid port name: {name}")
        check_port(c, pp, port)
    check_labels(c, f"{p}.labels", we.labels)
    if we.weight is not None and we.weight < 0:
        c.err(f"{p}.weight", "must be >= 0")
    if unix and service_ports is not None and len(service_ports) != 1:
        c.err(p, "exactly 1 service port required for unix endpoints")


def check_service_entry(c: Checker, ns: str, se: ServiceEntrySpec) -> None:
    if se.workload_selector is not None:
        check_selector_labels(
            c,
            "spec.workloadSelector.labels",
            se.workload_selector.labels,
            "it selects every workload",
        )
        if se.endpoints:
            c.err("spec", "only one of WorkloadSelector or Endpoints is allowed in Service Entry")
    if not se.hosts:
        c.err("spec.hosts", "service entry must have at least one host")
    for i, h in enumerate(se.hosts):
        p = f"spec.hosts[{i}]"
        if h == "*":
            c.err(p, f"invalid host {h}")
            continue
        err = H.check_wildcard_domain(h)
        if err:
            c.err(p, err)
        elif H.is_partial_wildcard(h):
            c.warn(p, f"partial wildcard {h!r} not allowed")
    cidr = False
    for i, a in enumerate(se.addresses):
        cidr = cidr or "/" in a
        err = H.check_ip_subnet(a)
        if err:
            c.err(f"spec.addresses[{i}]", err)
    resolution = se.resolution or "NONE"
    if cidr and resolution not in ("NONE", "STATIC"):
        c.err("spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types")
    names: set[str] = set()
    numbers: set[int] = set()
    for i, port in enumerate(se.ports):
        p = f"spec.ports[{i}]"
        name = port.name or ""
        if name in names:
            c.err(f"{p}.name", f"service entry port name {name!r} already defined")
        names.add(name)
        if port.number is None:
            c.err(f"{p}.number", "port number is required")
        else:
            if port.number in numbers:
                c.err(f"{p}.number", f"service entry port {port.number} already defined")
            numbers.add(port.number)
            check_port(c, f"{p}.number", port.number)
        if port.target_port is not None and port.target_port != 0:
            check_port(c, f"{p}.targetPort", port.target_port)
            if resolution == "NONE":
                c.warn(f"{p}.targetPort", "targetPort has no effect when resolution mode is NONE")
        if not H.is_dns1123_label(name):
            c.err(f"{p}.name", f"invalid port name: {name}")
        if port.protocol and port.protocol.upper() not in PROTOCOLS:
            c.err(f"{p}.protocol", f"unsupported protocol: {port.protocol}")
    if resolution == "NONE":
        if se.endpoints:
            c.err("spec.endpoints", "no endpoints should be provided for resolution type none")
        if se.workload_selector is not None:
            c.warn(
                "spec.workloadSelector",
                "workloadSelector should not be set when resolution mode is NONE",
            )
    elif resolution == "STATIC":
        if not se.endpoints and se.workload_selector is None:
            c.err(
                "spec.endpoints",
                "endpoints or a workloadSelector must be provided for resolution type STATIC",
            )
        for i, ep in enumerate(se.endpoints):
            check_workload_entry(c, f"spec.endpoints[{i}]", ep, names, allow_fqdn=False)
    else:  # DNS, DNS_ROUND_ROBIN
        if not se.endpoints:
            for i, h in enumerate(se.hosts):
                if h != "*" and H.check_fqdn(h):
                    c.err(
                        f"spec.hosts[{i}]",
                        f"hosts must be FQDN if no endpoints are provided for resolution mode {resolution}",
                    )
        if resolution == "DNS_ROUND_ROBIN" and len(se.endpoints) > 1:
            c.err(
                "spec.endpoints",
                f"there must only be 0 or 1 endpoint for resolution mode {resolution}",
            )
        for i, ep in enumerate(se.endpoints):
            check_workload_entry(c, f"spec.endpoints[{i}]", ep, names, allow_fqdn=True)
            if (ep.address or "").startswith("unix://"):
                c.err(
                    f"spec.endpoints[{i}].address", "unix endpoints require resolution type STATIC"
                )
        if se.workload_selector is not None:
            c.warn(
                "spec.workloadSelector",
                f"workloadSelector should not be set when resolution mode is {resolution}",
            )
    if resolution != "NONE" and len(se.hosts) > 1:
        for port in se.ports:
            proto = (port.protocol or "").upper()
            if proto not in HTTP_PROTOCOLS and proto not in TLS_PROTOCOLS:
                c.err("spec.ports", "multiple hosts provided with non-HTTP, non-TLS ports")
                break
    check_export_to(c, "spec.exportTo", ns, se.export_to, service_entry=True)


# --------------------------------------------------------------------------- security


def check_peer_authentication(c: Checker, ns: str, pa: PeerAuthenticationSpec) -> None:
    empty_selector = pa.selector is None or not pa.selector.match_labels
    if empty_selector and pa.port_level_mtls:
        c.err(
            "spec.portLevelMtls", "mesh/namespace peer authentication cannot have port level mTLS"
        )
    for port in pa.port_level_mtls:
        if not 1 <= port <= 65535:
            c.err(f"spec.portLevelMtls.{port}", "port must be in range 1..65535")
    if pa.selector is not None:
        _check_ws(c, "spec.selector", pa.selector)


def check_authorization_policy(c: Checker, ns: str, ap: AuthorizationPolicySpec) -> None:
    kinds = sum(1 for x in (ap.selector, ap.target_ref, ap.target_refs or None) if x is not None)
    if kinds > 1:
        c.err("spec", "only one of targetRefs or workloadSelector can be set")
    if ap.selector is not None:
        _check_ws(c, "spec.selector", ap.selector)
    refs = ([ap.target_ref] if ap.target_ref is not None else []) + list(ap.target_refs)
    for i, ref in enumerate(refs):
        p = (
            "spec.targetRef"
            if ap.target_ref is not None and i == 0
            else f"spec.targetRefs[{i - (1 if ap.target_ref else 0)}]"
        )
        if not ref.name:
            c.err(f"{p}.name", "targetRef name must be set")
        if ref.namespace:
            c.err(
                f"{p}.namespace",
                "targetRef namespace must not be set; cross namespace referencing is not supported",
            )
        if ref.kind not in ("Service", "ServiceEntry", "Gateway"):
            c.err(
                f"{p}.kind",
                f"targetRef must be to one of Service, ServiceEntry, Gateway but was {ref.group or ''}/{ref.kind or ''}",
            )
    action = ap.action or "ALLOW"
    if action == "CUSTOM":
        if ap.rules is None:
            c.err(
                "spec.rules",
                "CUSTOM action without `rules` is meaningless as it will never be triggered",
            )
        elif ap.provider is None or not ap.provider.name:
            c.err("spec.provider.name", "`provider.name` must not be empty")
    if ap.provider is not None and action != "CUSTOM":
        c.err("spec.provider", f"`provider` must not be with non CUSTOM action, found {action}")
    if action == "DENY" and ap.rules is None:
        c.err(
            "spec.rules", "DENY action without `rules` is meaningless as it will never be triggered"
        )
    for i, rule in enumerate(ap.rules or ()):
        rp = f"spec.rules[{i}]"
        _check_clauses(c, rp, i, "from", "source", rule.from_, _source_lists, _check_ip_blocks)
        _check_clauses(c, rp, i, "to", "operation", rule.to, _operation_lists, _check_ports)
        for j, cond in enumerate(rule.when):
            cp = f"{rp}.when[{j}]"
            if not cond.key:
                c.err(f"{cp}.key", "`key` must not be empty")
            elif not cond.values and not cond.not_values:
                c.err(cp, f"at least one of `values` or `notValues` must be set for key {cond.key}")


_Clause = TypeVar("_Clause", RuleFrom, RuleTo)


def _check_clauses(
    c: Checker,
    rp: str,
    i: int,
    side: str,
    part: str,
    clauses: tuple[_Clause, ...] | None,
    lists_of: Callable[[_Clause], Mapping[str, tuple[str, ...]] | None],
    check_more: Callable[[Checker, str, Mapping[str, tuple[str, ...]]], None],
) -> None:
    """The checks `from[].source` and `to[].operation` share: a present list is not
    empty, each entry has its part, the part sets at least one field, no value is
    empty; `check_more` then checks the values particular to the part."""
    if clauses is not None and len(clauses) == 0:
        c.err(f"{rp}.{side}", f"`{side}` must not be empty, found at rule {i}")
    for j, clause in enumerate(clauses or ()):
        p = f"{rp}.{side}[{j}].{part}"
        lists = lists_of(clause)
        if lists is None:
            c.err(p, f"`{side}.{part}` must not be nil, found at rule {i}")
            continue
        if not any(lists.values()):
            c.err(p, f"`{side}.{part}` must not be empty, found at rule {i}")
        _check_values(c, p, lists)
        check_more(c, p, lists)


def _source_lists(fr: RuleFrom) -> dict[str, tuple[str, ...]] | None:
    s = fr.source
    if s is None:
        return None
    return {
        "principals": s.principals,
        "notPrincipals": s.not_principals,
        "requestPrincipals": s.request_principals,
        "notRequestPrincipals": s.not_request_principals,
        "namespaces": s.namespaces,
        "notNamespaces": s.not_namespaces,
        "serviceAccounts": s.service_accounts,
        "notServiceAccounts": s.not_service_accounts,
        "ipBlocks": s.ip_blocks,
        "notIpBlocks": s.not_ip_blocks,
        "remoteIpBlocks": s.remote_ip_blocks,
        "notRemoteIpBlocks": s.not_remote_ip_blocks,
    }


def _operation_lists(to: RuleTo) -> dict[str, tuple[str, ...]] | None:
    o = to.operation
    if o is None:
        return None
    return {
        "hosts": o.hosts,
        "notHosts": o.not_hosts,
        "ports": o.ports,
        "notPorts": o.not_ports,
        "methods": o.methods,
        "notMethods": o.not_methods,
        "paths": o.paths,
        "notPaths": o.not_paths,
    }


def _check_ip_blocks(c: Checker, p: str, lists: Mapping[str, tuple[str, ...]]) -> None:
    for fname in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
        for k, ip in enumerate(lists[fname]):
            if ip and H.check_ip_subnet(ip):
                c.err(f"{p}.{fname}[{k}]", f"invalid IP address or CIDR range: {ip}")


def _check_ports(c: Checker, p: str, lists: Mapping[str, tuple[str, ...]]) -> None:
    for fname in ("ports", "notPorts"):
        for k, port in enumerate(lists[fname]):
            if port and (not port.isdigit() or not 0 < int(port) <= 65535):
                c.err(f"{p}.{fname}[{k}]", f"invalid port: {port}")


def _check_values(c: Checker, p: str, lists: Mapping[str, tuple[str, ...]]) -> None:
    for fname, values in lists.items():
        for k, v in enumerate(values):
            if v == "":
                c.err(f"{p}.{fname}[{k}]", f"empty value not allowed, found in {fname}")


# --------------------------------------------------------------------------- dispatch

_CHECKS: dict[str, Any] = {
    "VirtualService": check_virtual_service,
    "DestinationRule": check_destination_rule,
    "ServiceEntry": check_service_entry,
    "WorkloadEntry": lambda c, ns, we: check_workload_entry(c, "spec", we, None, allow_fqdn=True),
    "PeerAuthentication": check_peer_authentication,
    "AuthorizationPolicy": check_authorization_policy,
}


def check_spec(c: Checker, kind: str, namespace: str, spec: Any) -> None:
    """Run the semantic rules of ``kind`` on a decoded spec."""
    _CHECKS[kind](c, namespace, spec)


# --------------------------------------------------------------------------- cross-resource


def _route_destinations(vs: VirtualServiceSpec) -> Iterable[tuple[str, Destination]]:
    for i, r in enumerate(vs.http):
        p = f"spec.http[{i}]"
        for j, rd in enumerate(r.route):
            if rd.destination is not None:
                yield f"{p}.route[{j}].destination", rd.destination
        if r.mirror is not None:
            yield f"{p}.mirror", r.mirror
        for j, m in enumerate(r.mirrors):
            if m.destination is not None:
                yield f"{p}.mirrors[{j}].destination", m.destination
    for kind, routes in (("tcp", vs.tcp), ("tls", vs.tls)):
        for i, t in enumerate(routes):
            for j, rd in enumerate(t.route):
                if rd.destination is not None:
                    yield f"spec.{kind}[{i}].route[{j}].destination", rd.destination


def visible(export_to: tuple[str, ...], owner_ns: str, ns: str) -> bool:
    """Istio ``exportTo`` visibility of a resource of ``owner_ns`` from namespace ``ns``."""
    if not export_to:
        return True
    for e in export_to:
        if e == "*" or e == ns or (e == "." and owner_ns == ns):
            return True
    return False


ROOT_NAMESPACE = "istio-system"
"""Istio's config root namespace: its exported DestinationRules apply mesh-wide."""


def _private(r: Resource[DestinationRuleSpec]) -> bool:
    """A rule exported to its own namespace only (``exportTo: [.]`` or ``[<its namespace>]``)."""
    e = r.spec.export_to
    return len(e) == 1 and e[0] in (".", r.namespace)


class _NamespaceRules:
    """The DestinationRules of one namespace, by host."""

    __slots__ = ("exact", "wild")

    def __init__(self) -> None:
        self.exact: dict[str, list[Resource[DestinationRuleSpec]]] = {}
        self.wild: list[tuple[str, Resource[DestinationRuleSpec]]] = []

    def match(
        self, host: str, keep: Callable[[Resource[DestinationRuleSpec]], bool]
    ) -> list[Resource[DestinationRuleSpec]]:
        """The kept rules of the most specific host matching ``host``: the exact host, else
        the longest matching wildcard."""
        got = [r for r in self.exact.get(host, ()) if keep(r)]
        if got:
            return got
        best: str | None = None
        for pat, r in self.wild:
            if best is not None and pat != best:
                break
            if H.wildcard_matches(pat, host) and keep(r):
                best = pat
                got.append(r)
        return got


class DestinationRuleIndex:
    """DestinationRules by namespace and host, for the lookup Istio does for a proxy.

    Istio (``PushContext.destinationRule``) looks namespace by namespace and stops at the first
    that has a rule for the host; within a namespace the most specific host wins (the exact
    host, else the longest matching wildcard). Rules of any namespace but those three never
    apply. See :meth:`lookup`.
    """

    def __init__(self, rules: Iterable[Resource[DestinationRuleSpec]]) -> None:
        # every rule by expanded exact host, all namespaces (for the duplicate warnings)
        self.exact: dict[str, list[Resource[DestinationRuleSpec]]] = {}
        self.by_ns: dict[str, _NamespaceRules] = {}
        for r in rules:
            if r.spec.host is None:
                continue
            h = H.expand(r.spec.host, r.namespace)
            ns = self.by_ns.get(r.namespace)
            if ns is None:
                ns = self.by_ns[r.namespace] = _NamespaceRules()
            if h.startswith("*"):
                ns.wild.append((h, r))
            else:
                self.exact.setdefault(h, []).append(r)
                ns.exact.setdefault(h, []).append(r)
        for ns in self.by_ns.values():
            # most specific wildcard first: longest suffix wins, "*" last (stable: load order)
            ns.wild.sort(key=lambda hr: -len(hr[0]))

    def _match(
        self, ns: str, host: str, keep: Callable[[Resource[DestinationRuleSpec]], bool]
    ) -> list[Resource[DestinationRuleSpec]]:
        rules = self.by_ns.get(ns)
        return rules.match(host, keep) if rules is not None else []

    def lookup(
        self, host: str, from_ns: str, service_ns: str | None = None
    ) -> list[Resource[DestinationRuleSpec]]:
        """The DestinationRules that apply to ``host`` for a proxy in ``from_ns`` (the
        service being in ``service_ns``), in load order; the caller merges them.

        1. the proxy's namespace: its rules visible to itself (for a proxy in the root
           namespace, only the root's rules exported to itself alone);
        2. the service's namespace, then 3. the root namespace: their rules not private to
           themselves; the most specific host is chosen among those, then the rules for it not
           exported to the proxy's namespace are dropped (none left: go on).
        """
        if from_ns != ROOT_NAMESPACE:
            got = self._match(
                from_ns, host, lambda r: visible(r.spec.export_to, r.namespace, from_ns)
            )
        else:
            got = self._match(from_ns, host, _private)
        if got:
            return got
        for ns in (service_ns, ROOT_NAMESPACE):
            if ns is None:
                continue
            exported = self._match(ns, host, lambda r: not _private(r))
            got = [r for r in exported if visible(r.spec.export_to, r.namespace, from_ns)]
            if got:
                return got
        return []

    def anywhere(self, host: str) -> bool:
        """Whether a rule of any namespace names ``host`` (exactly or by a wildcard)."""
        return any(rules.match(host, _always) for rules in self.by_ns.values())


def _always(_r: Resource[DestinationRuleSpec]) -> bool:
    return True


def service_namespace_resolver(
    service_entries: Iterable[Resource[ServiceEntrySpec]],
) -> Callable[[str, str], str]:
    """``(host, from_ns) -> namespace``: the namespace of a ServiceEntry host as the
    translator sees it from ``from_ns``: the visible entry of that namespace if any, else the
    first visible one, else the host's own ``.NS.svc`` part, else ``from_ns``."""
    entries: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for se in service_entries:
        for raw in se.spec.hosts:
            entries.setdefault(H.expand(raw, se.namespace), []).append(
                (se.namespace, se.spec.export_to)
            )

    def service_namespace(host: str, from_ns: str) -> str:
        seen = [
            ns
            for ns, export_to in entries.get(host, ())
            if visible(export_to, ns, from_ns) and "~" not in export_to
        ]
        if from_ns in seen:
            return from_ns
        if seen:
            return seen[0]
        return H.namespace_of(host) or from_ns

    return service_namespace


def check_references(resources: Resources, report: ValidationReport) -> None:
    """Cross-resource checks: subsets named by routes, duplicate DestinationRules."""
    index = DestinationRuleIndex(resources.destination_rules)
    for hosts in index.exact.values():
        by_ns: dict[str, list[Resource[DestinationRuleSpec]]] = {}
        for r in hosts:
            if r.spec.workload_selector is None:
                by_ns.setdefault(r.namespace, []).append(r)
        for group in by_ns.values():
            for later in group[1:]:
                Checker(later.file, later.ref, report).warn(
                    "spec.host",
                    f"host {group[0].spec.host} already has DestinationRule/{group[0].name} in "
                    f"namespace {later.namespace} ({group[0].file}); the two are merged: the first "
                    f"traffic policy wins, subsets are added unless their name is taken",
                )
    service_namespace = service_namespace_resolver(resources.service_entries)
    for vs in resources.virtual_services:
        c = Checker(vs.file, vs.ref, report)
        for path, d in _route_destinations(vs.spec):
            if not d.subset or not d.host:
                continue
            host = H.expand(d.host, vs.namespace)
            # the rules a proxy of the VirtualService's namespace gets; a workloadSelector
            # never reaches across namespaces
            rules = [
                r
                for r in index.lookup(host, vs.namespace, service_namespace(host, vs.namespace))
                if r.spec.workload_selector is None or r.namespace == vs.namespace
            ]
            if not rules:
                if index.anywhere(host):
                    why = (
                        f"no DestinationRule for this host applies to namespace {vs.namespace} "
                        f"(only those of the proxy's namespace, or exported from the service's "
                        f"namespace or {ROOT_NAMESPACE}, do)"
                    )
                else:
                    why = "no DestinationRule for this host is loaded"
                c.warn(
                    f"{path}.subset",
                    f"subset {d.subset!r} of host {host}: {why} (the route will get no endpoints)",
                )
                continue
            names = {s.name for r in rules for s in r.spec.subsets if s.name}
            if d.subset not in names:
                refs = ", ".join(
                    f"DestinationRule/{r.name}"
                    if r.namespace == vs.namespace
                    else f"DestinationRule/{r.namespace}/{r.name}"
                    for r in rules
                )
                c.err(
                    f"{path}.subset",
                    f"subset {d.subset!r} is not defined by {refs} for host {host}",
                )
