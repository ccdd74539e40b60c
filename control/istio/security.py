"""Typed PeerAuthentication / AuthorizationPolicy resources -> the inbound security model (pure).

Theory of operation
-------------------
Input is :class:`~control.istio.resources.Resources`, already decoded and validated (so
values are well formed: CIDRs parse, ports are numbers, no empty lists). Each resource becomes
one frozen object of :mod:`meshproxy.config.security`, carrying a :class:`Meta` (kind, name,
namespace, file) for logs and ``/config_dump``; nothing here compiles matchers, that is the
data plane's per-snapshot job (:mod:`meshproxy.core.authz`), so the model stays plain data.

Policy age: Istio breaks ties between policies of one level by creationTimestamp, then name.
Resources carry no timestamp; as everywhere in ``control.istio``, load order (file order, then
document order) stands for age, so ``rank`` is ``(order, name)``.

What a sidecar cannot honour is kept out or neutralised, each with one warning line in the
``FILE: Kind/name: field.path: message`` form the rest of ``control.istio`` uses:

* ``targetRef`` / ``targetRefs``: such a policy binds to a waypoint or gateway, never to a
  sidecar, so it is left out.
* ``action: CUSTOM``: there is no ext_authz provider; as Istio does with an unusable provider,
  requests matching the policy's rules are denied.
* ``requestPrincipals`` and ``when`` keys ``request.auth.*`` / ``experimental.envoy.filters.*``:
  no JWT / Envoy metadata here, so they evaluate as for a request without a JWT.
* an unknown ``when`` key: Istio's builder skips that rule; so do we.
* ``istio.io/dry-run: "true"``: not enforced.
* a PeerAuthentication with a selector in the root namespace: Istio applies it to no workload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from control.istio.resources import (
    AuthorizationPolicySpec,
    Condition,
    MutualTLS,
    Operation,
    PeerAuthenticationSpec,
    Resource,
    Resources,
    Source,
)
from meshproxy.config.model import Meta
from meshproxy.config.security import (
    DRY_RUN_ANNOTATION,
    NO_VALUES,
    ROOT_NAMESPACE,
    AuthzAction,
    AuthzCondition,
    AuthzOperation,
    AuthzPolicy,
    AuthzRule,
    AuthzSource,
    MtlsMode,
    PeerAuthnPolicy,
    PeerAuthnTable,
    SecurityConfig,
    Values,
    when_key_kind,
)


@dataclass(frozen=True, slots=True)
class SecurityTranslation:
    """The model for the snapshot and the warnings translating it gave."""

    config: SecurityConfig
    warnings: tuple[str, ...] = ()


class _Warnings:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def add(self, r: Resource[Any], path: str, msg: str) -> None:
        line = f"{r.file}: {r.ref}: {path}: {msg}"
        if line not in self._seen:
            self._seen.add(line)
            self.lines.append(line)


def _meta(r: Resource[Any]) -> Meta:
    return Meta(kind=r.kind, name=r.name, namespace=r.namespace, file=r.file)


def _mode(m: MutualTLS | None) -> MtlsMode:
    if m is None or m.mode is None:
        return MtlsMode.UNSET
    return MtlsMode(m.mode)


def _labels(sel: Any) -> Mapping[str, str]:
    return dict(sel.match_labels) if sel is not None else {}


# --------------------------------------------------------------------------- PeerAuthentication


def peer_authn_policy(
    r: Resource[PeerAuthenticationSpec], w: _Warnings, root_namespace: str = ROOT_NAMESPACE
) -> PeerAuthnPolicy:
    spec = r.spec
    selector = _labels(spec.selector)
    ports: dict[int, MtlsMode] = {}
    if selector:
        ports = {int(p): _mode(m) for p, m in spec.port_level_mtls.items()}
        if r.namespace == root_namespace:
            w.add(
                r,
                "spec.selector",
                f"a workload-selector policy in the root namespace {root_namespace} "
                "applies to no workload (as in Istio); ignored",
            )
    return PeerAuthnPolicy(
        meta=_meta(r),
        namespace=r.namespace,
        selector=selector,
        mode=_mode(spec.mtls),
        port_modes=ports,
        rank=(r.order, r.name),
    )


# --------------------------------------------------------------------------- AuthorizationPolicy


def _v(values: tuple[str, ...], not_values: tuple[str, ...]) -> Values:
    return Values(tuple(values), tuple(not_values)) if values or not_values else NO_VALUES


def _source(s: Source, r: Resource[Any], path: str, w: _Warnings) -> AuthzSource:
    if s.request_principals or s.not_request_principals:
        w.add(
            r,
            f"{path}.requestPrincipals" if s.request_principals else f"{path}.notRequestPrincipals",
            "JWT authentication is not supported: every request counts as one without a JWT "
            "(requestPrincipals never match, notRequestPrincipals always match)",
        )
    return AuthzSource(
        principals=_v(s.principals, s.not_principals),
        request_principals=_v(s.request_principals, s.not_request_principals),
        namespaces=_v(s.namespaces, s.not_namespaces),
        service_accounts=_v(s.service_accounts, s.not_service_accounts),
        ip_blocks=_v(s.ip_blocks, s.not_ip_blocks),
        remote_ip_blocks=_v(s.remote_ip_blocks, s.not_remote_ip_blocks),
    )


def _operation(o: Operation) -> AuthzOperation:
    return AuthzOperation(
        hosts=_v(o.hosts, o.not_hosts),
        ports=_v(o.ports, o.not_ports),
        methods=_v(o.methods, o.not_methods),
        paths=_v(o.paths, o.not_paths),
    )


def _condition(
    c: Condition, r: Resource[Any], path: str, w: _Warnings
) -> tuple[AuthzCondition, bool]:
    """The condition and whether it is usable (False: unknown key, the rule is skipped)."""
    key = c.key or ""
    cond = AuthzCondition(key=key, match=_v(c.values, c.not_values))
    kind = when_key_kind(key)
    if kind is None:
        w.add(r, f"{path}.key", f"unknown attribute {key!r}: rule skipped (as Istio does)")
        return cond, False
    if kind == "absent":
        w.add(
            r,
            f"{path}.key",
            f"{key} is not supported (no JWT / Envoy metadata): it evaluates as absent "
            "(values never match, notValues always match)",
        )
    return cond, True


def authz_policy(r: Resource[AuthorizationPolicySpec], w: _Warnings) -> AuthzPolicy | None:
    """The model of one AuthorizationPolicy, or None when no sidecar enforces it."""
    spec = r.spec
    if spec.target_ref is not None or spec.target_refs:
        field_ = "spec.targetRef" if spec.target_ref is not None else "spec.targetRefs"
        w.add(
            r,
            field_,
            "targetRef policies bind to waypoints and gateways, not sidecars; ignored",
        )
        return None
    action = AuthzAction(spec.action or "ALLOW")
    if action is AuthzAction.CUSTOM:
        w.add(
            r,
            "spec.action",
            "CUSTOM needs an ext_authz provider, which meshproxy does not have: as Istio does "
            "with an unusable provider, requests matching its rules are denied",
        )
    dry_run = r.annotations.get(DRY_RUN_ANNOTATION, "").strip().lower() == "true"
    if dry_run:
        w.add(r, f"metadata.annotations.{DRY_RUN_ANNOTATION}", "dry-run policy: not enforced")
    rules: list[AuthzRule] = []
    for i, rule in enumerate(spec.rules or ()):
        rp = f"spec.rules[{i}]"
        sources = tuple(
            _source(fr.source, r, f"{rp}.from[{j}].source", w)
            for j, fr in enumerate(rule.from_ or ())
            if fr.source is not None
        )
        operations = tuple(_operation(to.operation) for to in rule.to or () if to.operation)
        conditions: list[AuthzCondition] = []
        usable = True
        for j, c in enumerate(rule.when):
            cond, ok = _condition(c, r, f"{rp}.when[{j}]", w)
            conditions.append(cond)
            usable = usable and ok
        rules.append(
            AuthzRule(
                sources=sources,
                operations=operations,
                conditions=tuple(conditions),
                skip=not usable,
            )
        )
    return AuthzPolicy(
        meta=_meta(r),
        namespace=r.namespace,
        action=action,
        selector=_labels(spec.selector),
        rules=tuple(rules),
        dry_run=dry_run,
    )


# --------------------------------------------------------------------------- entry point


def translate_security(
    resources: Resources, root_namespace: str = ROOT_NAMESPACE
) -> SecurityTranslation:
    """Every PeerAuthentication and AuthorizationPolicy of ``resources``, as the model."""
    w = _Warnings()
    pas = [peer_authn_policy(r, w, root_namespace) for r in resources.peer_authentications]
    authz = [p for r in resources.authorization_policies if (p := authz_policy(r, w)) is not None]
    config = SecurityConfig(
        peer_authn=PeerAuthnTable.of(pas, root_namespace),
        authz=tuple(authz),
        root_namespace=root_namespace,
    )
    return SecurityTranslation(config=config, warnings=tuple(w.lines))
