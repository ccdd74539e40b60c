"""The inbound security policy model: PeerAuthentication and AuthorizationPolicy, typed.

Theory of operation
-------------------
``control.istio.security`` turns validated Istio ``PeerAuthentication`` and
``AuthorizationPolicy`` resources into the frozen objects below; they travel inside the snapshot
(see :class:`SecurityConfig`) and are the only form the data plane reads. Two pure cores consume
them:

* :mod:`meshproxy.core.peerauthn` resolves the mTLS mode of one workload and port from
  :class:`PeerAuthnTable` (policies pre-indexed by namespace, each level's winner chosen once,
  as Istio does: the oldest policy wins).
* :mod:`meshproxy.core.authz` selects the :class:`AuthzPolicy` objects that apply to one
  workload and compiles them into matchers (sets, prefix/suffix tuples, IP networks) once per
  snapshot; per request it only evaluates.

Values stay Istio's strings here (``prefix*``, ``*suffix``, ``*``, CIDRs, ``ns/sa``): the
meaning of each form is decided in one place, the compiler in :mod:`meshproxy.core.authz`.
Everything is immutable; mappings are never mutated after construction. This module is
stdlib-only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshproxy.config.meta import Meta

#: Istio's default root namespace: a selector-less policy there is mesh-wide.
ROOT_NAMESPACE = "istio-system"

#: The annotation that makes an AuthorizationPolicy a dry run (evaluated, never enforced).
DRY_RUN_ANNOTATION = "istio.io/dry-run"


# --------------------------------------------------------------------------- PeerAuthentication


class MtlsMode(enum.Enum):
    """``PeerAuthentication.MutualTLS.Mode``. UNSET only ever appears inside a policy: it means
    "inherit from the parent level"; a resolution result is one of the other three."""

    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True, slots=True)
class PeerAuthnPolicy:
    """One PeerAuthentication.

    ``selector`` empty means namespace-wide (or mesh-wide in the root namespace). ``rank`` orders
    policies oldest first (Istio: creationTimestamp, then name); smaller is older.
    ``port_modes`` maps a workload port to its mode (UNSET = the policy's own mode).
    """

    meta: Meta
    namespace: str
    selector: Mapping[str, str] = field(default_factory=dict)
    mode: MtlsMode = MtlsMode.UNSET
    port_modes: Mapping[int, MtlsMode] = field(default_factory=dict)
    rank: tuple[object, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.meta.name}"


@dataclass(frozen=True, slots=True)
class PeerAuthnTable:
    """PeerAuthentication policies compiled for lookup.

    ``mesh`` is the oldest selector-less policy of the root namespace; ``namespace_wide`` maps
    a namespace to its oldest selector-less policy; ``workload`` maps a namespace to its
    selector policies, oldest first (the first whose selector matches wins). Selector policies
    in the root namespace are absent: Istio applies them to no workload.
    """

    root_namespace: str = ROOT_NAMESPACE
    mesh: PeerAuthnPolicy | None = None
    namespace_wide: Mapping[str, PeerAuthnPolicy] = field(default_factory=dict)
    workload: Mapping[str, tuple[PeerAuthnPolicy, ...]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        policies: tuple[PeerAuthnPolicy, ...] | list[PeerAuthnPolicy],
        root_namespace: str = ROOT_NAMESPACE,
    ) -> PeerAuthnTable:
        """Index ``policies`` (any order) the way Istio's ComposePeerAuthentication picks."""
        mesh: PeerAuthnPolicy | None = None
        ns_wide: dict[str, PeerAuthnPolicy] = {}
        wl: dict[str, list[PeerAuthnPolicy]] = {}
        for p in sorted(policies, key=lambda p: p.rank):
            if not p.selector:
                if p.namespace == root_namespace:
                    if mesh is None:
                        mesh = p
                else:
                    ns_wide.setdefault(p.namespace, p)
            elif p.namespace != root_namespace:
                wl.setdefault(p.namespace, []).append(p)
        return cls(
            root_namespace=root_namespace,
            mesh=mesh,
            namespace_wide=ns_wide,
            workload={ns: tuple(ps) for ns, ps in wl.items()},
        )  # fmt: skip

    def __len__(self) -> int:
        return (
            (self.mesh is not None)
            + len(self.namespace_wide)
            + sum(len(v) for v in self.workload.values())
        )


# --------------------------------------------------------------------------- AuthorizationPolicy


class AuthzAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True, slots=True)
class Values:
    """An Istio ``values`` / ``notValues`` pair (either may be empty = not set)."""

    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.values or self.not_values)


NO_VALUES = Values()


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """``Rule.From.source``: every set field must match (AND), each field's values are OR-ed."""

    principals: Values = NO_VALUES
    request_principals: Values = NO_VALUES
    namespaces: Values = NO_VALUES
    service_accounts: Values = NO_VALUES
    ip_blocks: Values = NO_VALUES
    remote_ip_blocks: Values = NO_VALUES


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    """``Rule.To.operation``: every set field must match (AND)."""

    hosts: Values = NO_VALUES
    ports: Values = NO_VALUES
    methods: Values = NO_VALUES
    paths: Values = NO_VALUES


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    """``Rule.when[]``: ``key`` is Istio's attribute (``request.headers[x-user]``,
    ``source.namespace`` ...)."""

    key: str
    match: Values = NO_VALUES


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """One rule: ``from`` (OR of sources) AND ``to`` (OR of operations) AND every ``when``.

    An empty ``sources`` / ``operations`` tuple means the side is absent (matches anything).
    ``skip`` is set when Istio would drop the rule (an unknown ``when`` attribute): a skipped
    rule never matches.
    """

    sources: tuple[AuthzSource, ...] = ()
    operations: tuple[AuthzOperation, ...] = ()
    conditions: tuple[AuthzCondition, ...] = ()
    skip: bool = False


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    """One AuthorizationPolicy that a sidecar may enforce.

    ``selector`` empty means every workload of ``namespace`` (every workload of the mesh in the
    root namespace); in the root namespace a selector matches workloads of every namespace.
    ``rules`` empty: the policy matches no request (for ALLOW: allow-nothing).
    ``dry_run``: evaluated for reporting only, never changes a decision.
    """

    meta: Meta
    namespace: str
    action: AuthzAction = AuthzAction.ALLOW
    selector: Mapping[str, str] = field(default_factory=dict)
    rules: tuple[AuthzRule, ...] = ()
    dry_run: bool = False

    @property
    def name(self) -> str:
        """``namespace/name``, the form reported in decisions."""
        return f"{self.namespace}/{self.meta.name}"


# --------------------------------------------------------------------------- when keys

#: ``when`` keys whose attribute needs JWT authentication or Envoy metadata meshproxy does not
#: have: they evaluate as absent (``values`` never match, ``notValues`` always match).
ABSENT_KEY_PREFIXES = ("request.auth.", "experimental.envoy.filters.")

#: ``when`` keys evaluated as such (``request.headers[NAME]`` aside).
KNOWN_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)


def header_name(key: str) -> str | None:
    """``request.headers[X-User]`` -> ``x-user`` (None when the key is not of that form)."""
    prefix = "request.headers["
    if key.startswith(prefix) and key.endswith("]") and len(key) > len(prefix) + 1:
        return key[len(prefix) : -1].strip().lower() or None
    return None


def when_key_kind(key: str) -> str | None:
    """``"known"``, ``"header"``, ``"absent"`` (unsupported attribute), or None for a key
    Istio does not know (its builder then skips the rule)."""
    if key in KNOWN_KEYS:
        return "known"
    if header_name(key) is not None:
        return "header"
    if key.startswith(ABSENT_KEY_PREFIXES):
        return "absent"
    return None


# --------------------------------------------------------------------------- together


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """The inbound side's policies, as the snapshot carries them."""

    peer_authn: PeerAuthnTable = field(default_factory=PeerAuthnTable)
    authz: tuple[AuthzPolicy, ...] = ()
    root_namespace: str = ROOT_NAMESPACE


EMPTY_SECURITY = SecurityConfig()
