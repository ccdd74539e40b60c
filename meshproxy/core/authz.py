"""AuthorizationPolicy evaluation for the inbound side (pure: no sockets, no event loop).

Theory of operation
-------------------
Once per snapshot, :func:`compile_policies` selects the policies that apply to this workload
(Istio's ListAuthorizationPolicies: policies of the workload's namespace and of the root
namespace, whose selector labels are a subset of the workload's labels; a selector-less policy
applies to every workload of its namespace, and of the mesh in the root namespace) and compiles
each rule into predicates over one request. Values are compiled the way Istio's generator
(pilot/pkg/security/authz/model) turns them into Envoy RBAC matchers:

* principals, ``source.principal``: ``spiffe://`` + value exact, ``prefix*``, ``*suffix``;
  ``*`` = any non-empty principal, so never a plaintext peer (Envoy's authenticated matcher).
* namespaces, ``source.namespace``: Istio matches the regex ``.*/ns/<value>/.*`` on the
  principal (``*`` inside the value = ``.*``); a plain value is a set lookup on the namespace
  parsed from the principal, a value with ``*`` a compiled regex.
* serviceAccounts: ``<sa>`` or ``<ns>/<sa>`` (namespace defaults to the policy's), the regex
  Istio builds, ``spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?``.
* ipBlocks / ``source.ip`` (the direct peer), remoteIpBlocks / ``remote.ip`` (the original
  client, the peer when none is known), ``destination.ip``: IP networks, single IPs are /32 or
  /128.
* methods, ``request.headers[...]``: Envoy header matchers, ``*`` = present.
* hosts: case-insensitive on the request authority as sent (``example.com`` does not match
  ``example.com:8080``, as in Istio, which asks for ``example.com:*`` there); ``*`` = present.
* paths: exact / ``prefix*`` / ``*suffix`` / ``*`` (non-empty) on the path without its query
  string; Istio path templates ``{*}`` (one segment) and ``{**}`` (any rest) become one regex.
* ports, ``destination.port``: a set of ints.
* requestPrincipals and ``request.auth.*`` / ``experimental.envoy.filters.*``: meshproxy has
  no JWT authentication, so every request is one without a JWT, exactly as Istio sees such a
  request: ``values`` never match and ``notValues`` always match.

A ``not*`` list is the negation of the OR of its values: a plaintext request has no principal,
so ``principals`` never match it and ``notPrincipals`` always do. Within a source or an
operation every set field must match; a rule is OR(from) AND OR(to) AND every ``when``.

Per request, :func:`evaluate` follows Istio's order: a matching CUSTOM policy (no ext_authz
provider exists here; Istio then turns the policy's rules into DENY rules) or DENY policy
denies; otherwise, if any ALLOW policy applies to the workload, one of them must match (an
ALLOW policy without rules matches nothing), else the request is allowed. AUDIT policies only
set ``Decision.audit``. Dry-run policies are not enforced.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from meshproxy.config.security import (
    ROOT_NAMESPACE,
    AuthzAction,
    AuthzCondition,
    AuthzOperation,
    AuthzPolicy,
    AuthzRule,
    AuthzSource,
    Values,
    header_name,
    when_key_kind,
)

SPIFFE_PREFIX = "spiffe://"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------- request, decision


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """What authorization looks at in one inbound request.

    ``principal`` is the verified peer's SPIFFE id (with or without ``spiffe://``) or None for
    a plaintext peer; ``namespace`` is parsed from it when not given. ``path`` is the request
    target as received (query string and dot segments are dealt with here). ``headers`` maps
    lower-case names to values (repeated headers joined with ``,``). ``remote_ip`` is the
    original client when known (defaults to ``source_ip``).
    """

    principal: str | None
    source_ip: str
    destination_port: int
    method: str
    path: str
    host: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    namespace: str | None = None
    remote_ip: str | None = None
    destination_ip: str | None = None
    sni: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """``policy`` is ``namespace/name`` of the policy that decided (None: no policy matched,
    i.e. allowed with no ALLOW policy, or denied because no ALLOW policy matched)."""

    allowed: bool
    policy: str | None = None
    audit: bool = False


ALLOWED = Decision(True)


def peer_namespace(principal: str | None) -> str | None:
    """The ``ns`` segment of a SPIFFE id (``spiffe://td/ns/NS/sa/SA`` -> ``NS``)."""
    if not principal:
        return None
    i = principal.find("/ns/")
    if i < 0:
        return None
    rest = principal[i + 4 :]
    j = rest.find("/")
    return rest if j < 0 else rest[:j]


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


def _pct(m: re.Match[str]) -> str:
    ch = chr(int(m.group(1), 16))
    return ch if ch in _UNRESERVED else "%" + m.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    segs = path.split("/")
    out: list[str] = []
    for seg in segs[1:]:
        if seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    result = "/" + "/".join(out)
    if segs[-1] in (".", "..") and not result.endswith("/"):
        result += "/"
    return result


def request_path(target: str) -> str:
    """The path authorization matches: no query string or fragment, percent-encoded
    unreserved characters decoded and dot segments removed (RFC 3986, as Envoy's
    ``normalize_path`` does by default in Istio); ``%2F`` stays encoded."""
    for sep in ("?", "#"):
        i = target.find(sep)
        if i >= 0:
            target = target[:i]
    if "%" in target:
        target = _PCT.sub(_pct, target)
    if "/." in target and target.startswith("/"):
        target = _remove_dot_segments(target)
    return target


class _Ctx:
    """One request, with the derived values computed at most once."""

    __slots__ = ("_dst", "_remote", "_src", "namespace", "path", "principal", "req")

    def __init__(self, req: AuthzRequest) -> None:
        self.req = req
        p = req.principal or None
        if p is not None and not p.startswith(SPIFFE_PREFIX):
            p = SPIFFE_PREFIX + p
        self.principal = p
        if p is None:
            self.namespace: str | None = None
        else:
            self.namespace = req.namespace if req.namespace else peer_namespace(p)
        self.path = request_path(req.path)
        self._src: IpAddress | bool | None = False
        self._remote: IpAddress | bool | None = False
        self._dst: IpAddress | bool | None = False

    def source_ip(self) -> IpAddress | None:
        if self._src is False:
            self._src = _ip(self.req.source_ip)
        return self._src  # type: ignore[return-value]

    def remote_ip(self) -> IpAddress | None:
        if self._remote is False:
            r = self.req.remote_ip
            self._remote = self.source_ip() if r is None else _ip(r)
        return self._remote  # type: ignore[return-value]

    def destination_ip(self) -> IpAddress | None:
        if self._dst is False:
            self._dst = _ip(self.req.destination_ip)
        return self._dst  # type: ignore[return-value]


def _ip(s: str | None) -> IpAddress | None:
    if not s:
        return None
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    try:
        return ipaddress.ip_address(s.split("%", 1)[0])
    except ValueError:
        return None


# --------------------------------------------------------------------------- value matchers

Pred = Callable[[_Ctx], bool]


def _always(c: _Ctx) -> bool:
    return True


def _never(c: _Ctx) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class StrMatcher:
    """An OR of string forms, checked cheapest first. ``present`` matches any value (even
    empty), ``nonempty`` any non-empty one; ``fold`` lower-cases the input (values are stored
    lower-cased)."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    regexes: tuple[re.Pattern[str], ...] = ()
    present: bool = False
    nonempty: bool = False
    fold: bool = False

    def match(self, v: str | None) -> bool:
        if v is None:
            return False
        if self.present or (self.nonempty and v):
            return True
        if self.fold:
            v = v.lower()
        if v in self.exact:
            return True
        if self.prefixes and v.startswith(self.prefixes):
            return True
        if self.suffixes and v.endswith(self.suffixes):
            return True
        return any(r.fullmatch(v) for r in self.regexes)


def _glob_regex(value: str, star: str) -> str:
    return star.join(re.escape(part) for part in value.split("*"))


def str_matcher(
    values: Iterable[str],
    *,
    star_present: bool = False,
    fold: bool = False,
    add_prefix: str = "",
    templates: bool = False,
) -> StrMatcher:
    """Compile Istio's value forms: ``*``; ``*suffix``; ``prefix*``; exact (``add_prefix`` is
    put before exact and prefix values, as Istio adds ``spiffe://`` to principals);
    with ``templates``, values holding ``{*}`` / ``{**}`` become path-template regexes."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    regexes: list[re.Pattern[str]] = []
    present = nonempty = False
    for v in values:
        if fold:
            v = v.lower()
        if templates and ("{*}" in v or "{**}" in v):
            regexes.append(re.compile(_path_template(v)))
        elif v == "*":
            if star_present:
                present = True
            else:
                nonempty = True
        elif v.startswith("*"):
            suffixes.append(v[1:])
        elif v.endswith("*"):
            prefixes.append(add_prefix + v[:-1])
        else:
            exact.add(add_prefix + v)
    return StrMatcher(
        exact=frozenset(exact),
        prefixes=tuple(prefixes),
        suffixes=tuple(suffixes),
        regexes=tuple(regexes),
        present=present,
        nonempty=nonempty,
        fold=fold,
    )


def _path_template(v: str) -> str:
    """``/a/{*}/b/{**}`` -> a full-match regex: ``{*}`` one non-empty segment, ``{**}`` the
    rest of the path (any number of segments)."""
    out: list[str] = []
    for i, part in enumerate(v.split("{**}")):
        if i:
            out.append(".*")
        out.append("[^/]+".join(re.escape(p) for p in part.split("{*}")))
    return "".join(out)


def _principal(values: tuple[str, ...]) -> Pred:
    m = str_matcher(values, add_prefix=SPIFFE_PREFIX)
    return lambda c: m.match(c.principal)


def _namespace(values: tuple[str, ...]) -> Pred:
    plain = frozenset(v for v in values if "*" not in v)
    regexes = tuple(re.compile(".*/ns/" + _glob_regex(v, ".*") + "/.*") for v in values if "*" in v)
    if not regexes:
        return lambda c: c.principal is not None and c.namespace in plain

    def match(c: _Ctx) -> bool:
        p = c.principal
        if p is None:
            return False
        if c.namespace in plain:
            return True
        return any(r.fullmatch(p) for r in regexes)

    return match


def _service_account(values: tuple[str, ...], policy_ns: str) -> Pred:
    regexes: list[re.Pattern[str]] = []
    for v in values:
        ns, sep, sa = v.partition("/")
        if not sep:
            ns, sa = policy_ns, v
        regexes.append(re.compile(f"spiffe://.+/ns/{re.escape(ns)}/(.+/|)sa/{re.escape(sa)}(/.+)?"))
    rs = tuple(regexes)

    def match(c: _Ctx) -> bool:
        p = c.principal
        return p is not None and any(r.fullmatch(p) for r in rs)

    return match


def networks(values: Iterable[str]) -> tuple[IpNetwork, ...]:
    """CIDRs and single addresses as networks (invalid ones are left out: validation has
    already reported them)."""
    out: list[IpNetwork] = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            continue
    return tuple(out)


def _in(ip: IpAddress | None, nets: tuple[IpNetwork, ...]) -> bool:
    if ip is None:
        return False
    return any(ip in n for n in nets)


def _source_ip(values: tuple[str, ...]) -> Pred:
    nets = networks(values)
    return lambda c: _in(c.source_ip(), nets)


def _remote_ip(values: tuple[str, ...]) -> Pred:
    nets = networks(values)
    return lambda c: _in(c.remote_ip(), nets)


def _destination_ip(values: tuple[str, ...]) -> Pred:
    nets = networks(values)
    return lambda c: _in(c.destination_ip(), nets)


def _ports(values: tuple[str, ...]) -> Pred:
    ports = frozenset(int(v) for v in values if v.strip().isdigit())
    return lambda c: c.req.destination_port in ports


def _methods(values: tuple[str, ...]) -> Pred:
    m = str_matcher(values, star_present=True)
    return lambda c: m.match(c.req.method)


def _hosts(values: tuple[str, ...]) -> Pred:
    m = str_matcher(values, star_present=True, fold=True)
    return lambda c: m.match(c.req.host)


def _paths(values: tuple[str, ...]) -> Pred:
    m = str_matcher(values, templates=True)
    return lambda c: m.match(c.path)


def _sni(values: tuple[str, ...]) -> Pred:
    m = str_matcher(values)
    return lambda c: m.match(c.req.sni)


def _header(name: str) -> Callable[[tuple[str, ...]], Pred]:
    def build(values: tuple[str, ...]) -> Pred:
        m = str_matcher(values, star_present=True)
        return lambda c: m.match(c.req.headers.get(name))

    return build


def _absent(values: tuple[str, ...]) -> Pred:
    return _never


def _field(v: Values, build: Callable[[tuple[str, ...]], Pred]) -> Pred | None:
    """``values`` AND NOT ``notValues`` (None when neither is set)."""
    pos = build(v.values) if v.values else None
    neg = build(v.not_values) if v.not_values else None
    if pos is not None and neg is not None:
        return lambda c: pos(c) and not neg(c)
    if neg is not None:
        return lambda c: not neg(c)
    return pos


def condition_builder(key: str) -> Callable[[tuple[str, ...]], Pred] | None:
    """How a ``when`` key's values are matched (None: an attribute Istio does not know)."""
    fixed: dict[str, Callable[[tuple[str, ...]], Pred]] = {
        "source.ip": _source_ip,
        "remote.ip": _remote_ip,
        "source.namespace": _namespace,
        "source.principal": _principal,
        "destination.ip": _destination_ip,
        "destination.port": _ports,
        "connection.sni": _sni,
    }
    got = fixed.get(key)
    if got is not None:
        return got
    name = header_name(key)
    if name is not None:
        return _header(name)
    if when_key_kind(key) == "absent":
        return _absent
    return None


def _all(preds: list[Pred]) -> Pred:
    if not preds:
        return _always
    if len(preds) == 1:
        return preds[0]
    ps = tuple(preds)

    def f(c: _Ctx) -> bool:
        for p in ps:
            if not p(c):
                return False
        return True

    return f


def _any(preds: list[Pred]) -> Pred:
    if not preds:
        return _never
    if len(preds) == 1:
        return preds[0]
    ps = tuple(preds)

    def f(c: _Ctx) -> bool:
        for p in ps:
            if p(c):
                return True
        return False

    return f


def _source(s: AuthzSource, policy_ns: str) -> Pred:
    parts = [
        _field(s.principals, _principal),
        _field(s.request_principals, _absent),
        _field(s.namespaces, _namespace),
        _field(s.service_accounts, lambda vs: _service_account(vs, policy_ns)),
        _field(s.ip_blocks, _source_ip),
        _field(s.remote_ip_blocks, _remote_ip),
    ]
    return _all([p for p in parts if p is not None])


def _operation(o: AuthzOperation) -> Pred:
    parts = [
        _field(o.hosts, _hosts),
        _field(o.methods, _methods),
        _field(o.paths, _paths),
        _field(o.ports, _ports),
    ]
    return _all([p for p in parts if p is not None])


def _condition(cond: AuthzCondition) -> Pred | None:
    build = condition_builder(cond.key)
    if build is None:
        return None
    return _field(cond.match, build) or _always


def compile_rule(rule: AuthzRule, policy_ns: str) -> Pred:
    """One rule as a predicate (a skipped rule, or one with an unknown ``when`` key, as Istio's
    builder skips it: never matches)."""
    if rule.skip:
        return _never
    parts: list[Pred] = []
    if rule.sources:
        parts.append(_any([_source(s, policy_ns) for s in rule.sources]))
    if rule.operations:
        parts.append(_any([_operation(o) for o in rule.operations]))
    for cond in rule.conditions:
        p = _condition(cond)
        if p is None:
            return _never
        parts.append(p)
    return _all(parts)


# --------------------------------------------------------------------------- table


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    action: AuthzAction
    match: Pred

    def __repr__(self) -> str:
        return f"CompiledPolicy({self.action.value} {self.name})"


@dataclass(frozen=True, slots=True)
class AuthzTable:
    """The policies that apply to one workload, compiled, by action (each in input order)."""

    deny: tuple[CompiledPolicy, ...] = ()  # CUSTOM (as deny) first, then DENY
    allow: tuple[CompiledPolicy, ...] = ()
    audit: tuple[CompiledPolicy, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.deny or self.allow or self.audit)

    @property
    def policies(self) -> tuple[str, ...]:
        return tuple(f"{p.action.value} {p.name}" for p in (*self.deny, *self.allow, *self.audit))

    def __repr__(self) -> str:
        return f"AuthzTable({', '.join(self.policies) or 'no policy'})"


EMPTY_TABLE = AuthzTable()


def applies_to(
    policy: AuthzPolicy,
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = ROOT_NAMESPACE,
) -> bool:
    """Whether ``policy`` attaches to the workload ``namespace`` / ``labels``."""
    if policy.namespace != namespace and policy.namespace != root_namespace:
        return False
    return all(labels.get(k) == v for k, v in policy.selector.items())


def compile_policies(
    policies: Iterable[AuthzPolicy],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = ROOT_NAMESPACE,
) -> AuthzTable:
    """Select and compile the policies that apply to the workload (dry-run ones excluded)."""
    custom: list[CompiledPolicy] = []
    deny: list[CompiledPolicy] = []
    allow: list[CompiledPolicy] = []
    audit: list[CompiledPolicy] = []
    lists = {
        AuthzAction.CUSTOM: custom,
        AuthzAction.DENY: deny,
        AuthzAction.ALLOW: allow,
        AuthzAction.AUDIT: audit,
    }
    for p in policies:
        if p.dry_run or not applies_to(p, namespace, labels, root_namespace):
            continue
        match = _any([compile_rule(r, p.namespace) for r in p.rules])
        lists[p.action].append(CompiledPolicy(p.name, p.action, match))
    return AuthzTable(deny=(*custom, *deny), allow=tuple(allow), audit=tuple(audit))


def evaluate(table: AuthzTable, req: AuthzRequest) -> Decision:
    """Istio's decision for ``req``: CUSTOM/DENY first, then ALLOW; AUDIT only reported."""
    if not (table.deny or table.allow or table.audit):
        return ALLOWED
    c = _Ctx(req)
    audit = False
    for p in table.audit:
        if p.match(c):
            audit = True
            break
    for p in table.deny:
        if p.match(c):
            return Decision(False, p.name, audit)
    if not table.allow:
        return Decision(True, None, audit)
    for p in table.allow:
        if p.match(c):
            return Decision(True, p.name, audit)
    return Decision(False, None, audit)
