"""The contract between translation (``control.istio``) and the data plane.

Theory of operation
-------------------
Istio YAML is parsed and validated once, at the edge, by ``control.istio``; the pure
translation there turns it into one :class:`Snapshot` built from the frozen dataclasses below.
The data plane never reads raw dicts: a request reads ``state.snapshot`` once and works on
these objects only. Everything a request needs is precomputed here (compiled regexes,
host -> virtual host tables, label-selected endpoint lists, total weights), so per-request
work is lookups, not scans.

Every route and cluster carries a :class:`Meta` naming the Istio resource it came from; the
admin ``/config_dump``, logs and metric labels show it.

Conventions
-----------
* Durations are float seconds; ``None`` means "not set / no limit".
* Header names are lower-case.
* Hosts are lower-case fully qualified names (``reviews.default.svc.cluster.local``) or
  wildcards (``*.example.com``); short-name aliases live only in :class:`RouteTable`.
* Mappings are plain dicts that nobody mutates after translation (the whole snapshot is
  replaced, never edited).

This module is stdlib-only.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshproxy.config.meta import Meta

if TYPE_CHECKING:
    from meshproxy.config.security import SecurityConfig

# Provenance (Meta, imported above) lives in its own module so meshproxy.config.security can use
# it without importing this one (this module's Snapshot refers to security's types).

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# --------------------------------------------------------------------------- matching


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"  # Istio's `{}`: the header / param must be present, any value


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio ``StringMatch``. For REGEX, ``regex`` is compiled once (full-match, RE2-like).

    With ``ignore_case`` the ``value`` is stored lower-cased and the regex compiled with
    ``re.IGNORECASE``; the matcher lower-cases the input.
    """

    kind: MatchKind
    value: str = ""
    ignore_case: bool = False
    regex: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class Match:
    """One Istio ``HTTPMatchRequest``: every present condition must hold (AND).

    ``source_labels`` / ``source_namespace`` are decided at translation time for the proxy the
    snapshot is built for (routes that cannot apply are dropped), so they are not here.
    ``port`` is compared with the request's destination port (from the authority, or the
    service port of an absolute-form / redirected request).
    """

    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None


# --------------------------------------------------------------------------- route actions


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Istio ``Headers.HeaderOperations``: applied in Envoy's order remove, set, add."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)


NO_HEADER_OPS = HeaderOps()


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    request: HeaderOps = NO_HEADER_OPS
    response: HeaderOps = NO_HEADER_OPS

    @property
    def empty(self) -> bool:
        return self.request.empty and self.response.empty


NO_HEADERS = HeaderPolicy()


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    """One ``HTTPRouteDestination``.

    ``cluster`` names the entry in :attr:`Snapshot.clusters` for the destination's port.
    When the destination gave no port and its service has several, ``by_port`` maps the
    request's port to the cluster name for that port (``cluster`` is then the first port's).
    """

    cluster: str
    weight: int
    host: str
    subset: str | None = None
    port: int | None = None
    headers: HeaderPolicy = NO_HEADERS
    by_port: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Redirect:
    """Istio ``HTTPRedirect``. ``derive_port`` is ``FROM_PROTOCOL_DEFAULT`` or
    ``FROM_REQUEST_PORT`` (or None)."""

    uri: str | None = None
    authority: str | None = None
    scheme: str | None = None
    port: int | None = None
    derive_port: str | None = None
    code: int = 301


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Istio ``HTTPRewrite``: ``uri`` replaces the matched prefix (or the whole path when the
    match was not a prefix match); ``uri_regex`` / ``uri_regex_sub`` rewrite the path with a
    regex substitution; ``authority`` replaces the Host."""

    uri: str | None = None
    authority: str | None = None
    uri_regex: re.Pattern[str] | None = None
    uri_regex_sub: str | None = None


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Istio ``HTTPRetry``. ``attempts`` counts retries (1 + attempts tries at most).

    The defaults are Istio's ``DefaultPolicy()`` (pilot/pkg/networking/core/route/retry) since
    1.24: 2 retries on connect-failure, refused-stream, unavailable, cancelled and
    retriable-status-codes with no codes (503 was removed by istio/istio#52111 because it
    replayed non-idempotent requests). A ``retries`` block without ``retryOn`` keeps these
    conditions and codes; a ``retryOn`` replaces both (its bare numbers are the codes). The
    data plane adds one thing to the default policy only (``Settings.default_retry_503``): a
    503 is retried for idempotent methods.
    """

    attempts: int = 2
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset(
        {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    )
    retriable_status_codes: frozenset[int] = frozenset()
    retry_remote_localities: bool = False


DEFAULT_RETRY = RetryPolicy()  # Istio's default when a route has no `retries` block


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """Istio ``HTTPFaultInjection``. Fractions are 0.0..1.0 (Istio percentage / 100); an absent
    percentage means 0 (no request affected), as in Istio."""

    delay: float | None = None
    delay_fraction: float = 0.0
    abort_status: int | None = None
    abort_fraction: float = 0.0


@dataclass(frozen=True, slots=True)
class Mirror:
    cluster: str
    host: str
    fraction: float = 1.0
    subset: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """One Istio ``HTTPRoute``. ``matches`` empty means "matches every request".

    Exactly one of ``clusters`` (non-empty), ``redirect`` or ``direct_response`` is the action.
    ``total_weight`` is the sum of ``clusters`` weights (> 0 when there are clusters).
    """

    name: str
    meta: Meta
    matches: tuple[Match, ...] = ()
    clusters: tuple[WeightedCluster, ...] = ()
    total_weight: int = 0
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    headers: HeaderPolicy = NO_HEADERS
    timeout: float | None = None
    retries: RetryPolicy | None = DEFAULT_RETRY
    fault: FaultPolicy | None = None
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualHost:
    """All routes for one set of hosts. ``meta`` is the VirtualService, or the ServiceEntry
    when the host has no VirtualService (then a single catch-all route to the service)."""

    name: str
    meta: Meta
    domains: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Host -> virtual host, in O(1) for exact names.

    ``exact`` holds every alias of every host, lower-case, without port: the FQDN and, for
    ``*.svc.cluster.local`` names, ``name.ns.svc``, ``name.ns`` and the short ``name`` (short
    names of the proxy's own namespace win a clash). ``wildcards`` maps the suffix of a
    ``*.suffix`` host, with its leading dot (``".example.com"``), to its virtual host; a lookup
    walks the request host's dot-suffixes longest first (O(labels), not O(wildcards)).
    ``catch_all`` is the virtual host for ``"*"``, tried last.
    """

    exact: Mapping[str, VirtualHost] = field(default_factory=dict)
    wildcards: Mapping[str, VirtualHost] = field(default_factory=dict)
    catch_all: VirtualHost | None = None
    # ServiceEntry ``addresses`` (the service's VIPs) for requests redirected by iptables whose
    # Host names no route: IP -> {service port: host}, CIDR entries in ``address_ranges``
    # (first entry wins); see meshproxy.core.routing.host_for_address
    addresses: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    address_ranges: tuple[tuple[IPNetwork, Mapping[int, str]], ...] = ()


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream endpoint. ``address`` is an IP or a host name; ``port`` is resolved
    (endpoint port-map entry, else the service's target port, else the service port)."""

    address: str
    port: int
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    locality: str = ""
    network: str = ""
    service_account: str = ""
    meta: Meta | None = None

    @property
    def key(self) -> str:
        """``IP:PORT`` (``[v6]:PORT`` for IPv6), as shown in /clusters."""
        if ":" in self.address:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


class LbKind(enum.Enum):
    LEAST_REQUEST = "LEAST_REQUEST"  # Istio's default: power of two choices
    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    CONSISTENT_HASH = "CONSISTENT_HASH"


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """Istio ``ConsistentHashLB``; exactly one key source is set."""

    header: str | None = None
    cookie: str | None = None
    cookie_path: str | None = None
    cookie_ttl: float | None = None
    query_param: str | None = None
    source_ip: bool = False
    ring_size: int = 1024  # Istio's minimumRingSize default


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    kind: LbKind = LbKind.LEAST_REQUEST
    hash: ConsistentHash | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """Istio ``ConnectionPoolSettings`` with Istio / Envoy defaults."""

    max_connections: int = 2**32 - 1
    connect_timeout: float = 10.0
    max_pending_requests: int = 2**32 - 1
    max_requests: int = 2**32 - 1
    max_requests_per_connection: int = 0  # 0 = unlimited
    max_retries: int = 2**32 - 1
    idle_timeout: float = 3600.0  # Istio's default upstream idle timeout is 1 h


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Istio ``TrafficPolicy.retryBudget`` / Envoy ``RetryBudget``: at most ``percent`` % of the
    cluster's active plus pending requests may be retries at once, but never fewer than
    ``min_concurrency`` concurrent retries. When a cluster has no budget the data plane applies
    its own default (``Settings.retry_budget_percent`` / ``..._min``), which Istio does not."""

    percent: float = 20.0
    min_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Istio ``OutlierDetection`` (present only when the DestinationRule has one)."""

    consecutive_5xx: int | None = 5
    consecutive_gateway_errors: int | None = None
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failures: int | None = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


class TlsMode(enum.Enum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """Istio ``ClientTLSSettings`` of a cluster. ``subject_alt_names`` are the DestinationRule's,
    else (ISTIO_MUTUAL) the ServiceEntry's. ``auto`` marks Istio's auto-mTLS: no DestinationRule
    ``tls`` and a ``location: MESH_INTERNAL`` ServiceEntry; the data plane uses ISTIO_MUTUAL
    then only when it has a workload identity, plaintext otherwise."""

    mode: TlsMode = TlsMode.DISABLE
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    insecure_skip_verify: bool = False
    auto: bool = False


@dataclass(frozen=True, slots=True)
class Cluster:
    """An upstream cluster: a service port, optionally narrowed to a subset.

    ``name`` is ``host`` or ``host|subset`` for a single-port service, ``host:port`` or
    ``host:port|subset`` when the service has several ports. ``endpoints`` are already
    selected by the subset's labels. ``service_name`` / ``service_namespace`` feed Istio's
    ``destination_service_*`` metric labels; ``meta`` is the ServiceEntry, ``policy_meta`` the
    DestinationRule whose traffic policy applies (if any).
    """

    name: str
    host: str
    port: int
    subset: str | None = None
    endpoints: tuple[Endpoint, ...] = ()
    lb: LoadBalancer = field(default_factory=LoadBalancer)
    pool: ConnectionPool = field(default_factory=ConnectionPool)
    outlier: OutlierPolicy | None = None
    tls: TlsPolicy | None = None
    retry_budget: RetryBudget | None = None
    protocol: str = "HTTP"
    service_name: str = ""
    service_namespace: str = ""
    meta: Meta | None = None
    policy_meta: Meta | None = None


# --------------------------------------------------------------------------- snapshot


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """Who the snapshot is built for: decides ``sourceLabels`` / ``sourceNamespace`` matches,
    ``exportTo`` visibility and which short names resolve."""

    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    node_id: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the data plane needs, immutable. Swapped whole, never edited."""

    version: str
    routes: RouteTable = field(default_factory=RouteTable)
    clusters: Mapping[str, Cluster] = field(default_factory=dict)
    proxy: ProxyIdentity = field(default_factory=ProxyIdentity)
    warnings: tuple[str, ...] = ()
    # PeerAuthentication / AuthorizationPolicy for the inbound listener (the whole mesh's:
    # the data plane selects what applies to its own workload once per snapshot)
    security: SecurityConfig = field(default_factory=lambda: _empty_security())


def _empty_security() -> SecurityConfig:
    from meshproxy.config.security import EMPTY_SECURITY  # it imports Meta from here

    return EMPTY_SECURITY


EMPTY_SNAPSHOT = Snapshot(version="")
