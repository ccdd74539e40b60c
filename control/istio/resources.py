"""Typed Istio resources: one frozen dataclass per Istio API message.

Theory of operation
-------------------
These classes mirror istio.io/api (networking v1alpha3/v1beta1/v1, security v1beta1/v1,
type v1beta1) field for field, so the set of fields accepted from YAML is exactly Istio's: the
decoder in :mod:`control.istio.schema` derives its schema from the annotations below and
reports any other key as ``unknown field``. Every optional scalar defaults to ``None`` so that
"absent" stays distinguishable from a zero value (Istio gives absence its own meaning, e.g. a
missing ``weight`` or ``retries``). Repeated fields are tuples, maps are dicts that nobody
mutates after decoding.

A loaded document becomes a :class:`Resource`: kind, name, namespace (``default`` when
absent), the file it came from, its position in load order, a digest of its content (for the
snapshot version) and its typed ``spec``. :class:`Resources` groups them by kind, in load
order (Istio's tie-breaker, "oldest first", is file order here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from control.istio.schema import MEMOIZED, Duration

S = TypeVar("S")


# --------------------------------------------------------------------------- common messages


@dataclass(frozen=True, slots=True)
class StringMatch:
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True)
class PortSelector:
    number: int | None = None


@dataclass(frozen=True, slots=True)
class Percent:
    value: float | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    host: str | None = None
    subset: str | None = None
    port: PortSelector | None = None


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """``type.v1beta1.WorkloadSelector`` (DestinationRule, PeerAuthentication, AuthzPolicy)."""

    match_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyTargetReference:
    group: str | None = None
    kind: str | None = None
    name: str | None = None
    namespace: str | None = None


# --------------------------------------------------------------------------- VirtualService


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: dict[str, str] = field(default_factory=dict)
    add: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = field(default_factory=dict, metadata={"null_is_empty": True})
    port: int | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    query_params: dict[str, StringMatch] = field(
        default_factory=dict, metadata={"null_is_empty": True}
    )
    ignore_uri_case: bool | None = None
    without_headers: dict[str, StringMatch] = field(
        default_factory=dict, metadata={"null_is_empty": True}
    )
    source_namespace: str | None = None
    stat_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination | None = None
    weight: int | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination | None = None
    weight: int | None = None


@dataclass(frozen=True, slots=True)
class Delegate:
    name: str | None = None
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    derive_port: str | None = field(
        default=None, metadata={"enum": ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")}
    )
    scheme: str | None = None
    redirect_code: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPBody:
    string: str | None = None
    bytes: str | None = None  # base64, as protobuf JSON encodes bytes


@dataclass(frozen=True, slots=True)
class HTTPDirectResponse:
    status: int | None = None
    body: HTTPBody | None = None


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    match: str | None = None
    rewrite: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int | None = None
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: Duration | None = None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_origin: tuple[str, ...] = ()  # deprecated
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str | None = field(
        default=None, metadata={"enum": ("UNSPECIFIED", "FORWARD", "IGNORE")}
    )


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: Duration | None = None
    exponential_delay: Duration | None = None
    percentage: Percent | None = None
    percent: int | None = None  # deprecated integer percentage


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class HTTPMirrorPolicy:
    destination: Destination | None = None
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percent: int | None = None  # deprecated UInt32Value
    mirror_percentage: Percent | None = None
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None
    websocket_upgrade: bool | None = None  # legacy (pre-1.0) field still found in old YAML


@dataclass(frozen=True, slots=True)
class L4MatchAttributes:
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_subnet: str | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class TLSMatchAttributes:
    sni_hosts: tuple[str, ...] = ()
    destination_subnets: tuple[str, ...] = ()
    port: int | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class TCPRoute:
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class TLSRoute:
    match: tuple[TLSMatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualServiceSpec:
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# --------------------------------------------------------------------------- DestinationRule

SIMPLE_LB = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")


@dataclass(frozen=True, slots=True)
class HTTPCookieAttribute:
    name: str | None = None
    value: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPCookie:
    name: str | None = None
    path: str | None = None
    ttl: Duration | None = None
    attributes: tuple[HTTPCookieAttribute, ...] = ()


@dataclass(frozen=True, slots=True)
class RingHash:
    minimum_ring_size: int | None = None


@dataclass(frozen=True, slots=True)
class MagLev:
    table_size: int | None = None


@dataclass(frozen=True, slots=True)
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: int | None = None  # deprecated


@dataclass(frozen=True, slots=True)
class LocalityDistribute:
    from_: str | None = field(default=None, metadata={"json": "from"})
    to: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LocalityFailover:
    from_: str | None = field(default=None, metadata={"json": "from"})
    to: str | None = None


@dataclass(frozen=True, slots=True)
class LocalityLoadBalancerSetting:
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[str, ...] = ()
    enabled: bool | None = None


@dataclass(frozen=True, slots=True)
class WarmupConfiguration:
    duration: Duration | None = None
    minimum_percent: float | None = None
    aggression: float | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    simple: str | None = field(default=None, metadata={"enum": SIMPLE_LB})
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: Duration | None = None
    warmup: WarmupConfiguration | None = None


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    probes: int | None = None
    time: Duration | None = None
    interval: Duration | None = None


@dataclass(frozen=True, slots=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = field(
        default=None, metadata={"json": "http1MaxPendingRequests"}
    )
    http2_max_requests: int | None = field(default=None, metadata={"json": "http2MaxRequests"})
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: str | None = field(
        default=None,
        metadata={"json": "h2UpgradePolicy", "enum": ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")},
    )
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_5xx_errors: int | None = field(
        default=None, metadata={"json": "consecutive5xxErrors"}
    )
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None
    consecutive_errors: int | None = None  # deprecated; Istio validates it, then ignores it


@dataclass(frozen=True, slots=True)
class ClientTLSSettings:
    mode: str | None = field(
        default=None, metadata={"enum": ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")}
    )
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = None


@dataclass(frozen=True, slots=True)
class PortTrafficPolicy:
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    protocol: str | None = None
    target_host: str | None = None
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class ProxyProtocol:
    version: str | None = field(default=None, metadata={"enum": ("V1", "V2")})


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """``TrafficPolicy.RetryBudget`` (Istio 1.27+): Envoy's
    ``circuit_breakers.thresholds[].retry_budget``. ``percent`` is a ``DoubleValue`` (absent =
    20 %), ``min_retry_concurrency`` a ``uint32`` (0 / absent = 3), ``budget_interval`` the
    newer window over which requests are counted (absent / 0 = only active and pending ones).
    A field of ``TrafficPolicy`` (so of a subset's policy too), not of ``PortTrafficPolicy``."""

    percent: float | None = None
    min_retry_concurrency: int | None = None
    budget_interval: Duration | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None
    retry_budget: RetryBudget | None = None


@dataclass(frozen=True, slots=True)
class Subset:
    name: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRuleSpec:
    host: str | None = None
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: WorkloadSelector | None = None


# --------------------------------------------------------------------------- ServiceEntry


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int | None = None
    protocol: str | None = None
    name: str | None = None
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEntrySpec:
    """``WorkloadEntry`` spec; also the type of ``ServiceEntry.endpoints``."""

    address: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    network: str | None = None
    locality: str | None = None
    weight: int | None = None
    service_account: str | None = None


@dataclass(frozen=True, slots=True)
class SEWorkloadSelector:
    """``networking.WorkloadSelector`` (ServiceEntry): ``labels``, not ``matchLabels``."""

    labels: dict[str, str] = field(default_factory=dict)


LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")


@dataclass(frozen=True, slots=True)
class ServiceEntrySpec:
    hosts: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: str | None = field(default=None, metadata={"enum": LOCATIONS})
    resolution: str | None = field(default=None, metadata={"enum": RESOLUTIONS})
    endpoints: tuple[WorkloadEntrySpec, ...] = ()
    workload_selector: SEWorkloadSelector | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()


# --------------------------------------------------------------------------- security

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")


@dataclass(frozen=True, slots=True)
class MutualTLS:
    mode: str | None = field(default=None, metadata={"enum": MTLS_MODES})


@dataclass(frozen=True, slots=True)
class PeerAuthenticationSpec:
    selector: WorkloadSelector | None = None
    mtls: MutualTLS | None = None
    port_level_mtls: dict[int, MutualTLS] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleFrom:
    source: Source | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleTo:
    operation: Operation | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    key: str | None = None
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    from_: tuple[RuleFrom, ...] | None = field(default=None, metadata={"json": "from"})
    to: tuple[RuleTo, ...] | None = None
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class ExtensionProvider:
    name: str | None = None


AUTHZ_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")


@dataclass(frozen=True, slots=True)
class AuthorizationPolicySpec:
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    rules: tuple[Rule, ...] | None = None
    action: str | None = field(default=None, metadata={"enum": AUTHZ_ACTIONS})
    provider: ExtensionProvider | None = None


# --------------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """Kubernetes ``metadata``: what we use is typed, the rest is accepted and kept opaque."""

    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    generate_name: str | None = None
    uid: object = None
    resource_version: object = None
    generation: object = None
    creation_timestamp: object = None
    deletion_timestamp: object = None
    deletion_grace_period_seconds: object = None
    owner_references: object = None
    finalizers: object = None
    managed_fields: object = None
    self_link: object = None


# Sub-structures that configs repeat (the same rule, match, header block or traffic policy in
# many resources): equal raw values decode to one shared object (see schema.MEMOIZED).
MEMOIZED.update({HTTPRoute, HTTPMatchRequest, Headers, HTTPRetry, TrafficPolicy, Subset})

SPEC_TYPES: dict[str, type] = {
    "VirtualService": VirtualServiceSpec,
    "DestinationRule": DestinationRuleSpec,
    "ServiceEntry": ServiceEntrySpec,
    "WorkloadEntry": WorkloadEntrySpec,
    "PeerAuthentication": PeerAuthenticationSpec,
    "AuthorizationPolicy": AuthorizationPolicySpec,
}

API_VERSIONS: dict[str, tuple[str, ...]] = {
    "VirtualService": ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                       "networking.istio.io/v1alpha3"),
    "DestinationRule": ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                        "networking.istio.io/v1alpha3"),
    "ServiceEntry": ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                     "networking.istio.io/v1alpha3"),
    "WorkloadEntry": ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                      "networking.istio.io/v1alpha3"),
    "PeerAuthentication": ("security.istio.io/v1", "security.istio.io/v1beta1"),
    "AuthorizationPolicy": ("security.istio.io/v1", "security.istio.io/v1beta1"),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Resource(Generic[S]):
    """One validated Istio document."""

    kind: str
    name: str
    namespace: str
    spec: S
    file: str = ""
    order: int = 0  # position in load order (file order, then document order)
    api_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    digest: str = ""  # sha256 of the document's canonical JSON

    @property
    def ref(self) -> str:
        """``Kind/name``, as used in problem lines."""
        return f"{self.kind}/{self.name}"

    def __repr__(self) -> str:
        return f"Resource({self.kind}/{self.namespace}/{self.name} from {self.file!r})"


@dataclass(frozen=True, slots=True)
class Resources:
    """Validated resources by kind, each tuple in load order."""

    virtual_services: tuple[Resource[VirtualServiceSpec], ...] = ()
    destination_rules: tuple[Resource[DestinationRuleSpec], ...] = ()
    service_entries: tuple[Resource[ServiceEntrySpec], ...] = ()
    workload_entries: tuple[Resource[WorkloadEntrySpec], ...] = ()
    peer_authentications: tuple[Resource[PeerAuthenticationSpec], ...] = ()
    authorization_policies: tuple[Resource[AuthorizationPolicySpec], ...] = ()

    @classmethod
    def of(cls, items: list[Resource[Any]]) -> Resources:
        """Group ``items`` (in load order) by kind."""
        by: dict[str, list[Resource[Any]]] = {k: [] for k in SPEC_TYPES}
        for r in items:
            by[r.kind].append(r)
        return cls(
            virtual_services=tuple(by["VirtualService"]),
            destination_rules=tuple(by["DestinationRule"]),
            service_entries=tuple(by["ServiceEntry"]),
            workload_entries=tuple(by["WorkloadEntry"]),
            peer_authentications=tuple(by["PeerAuthentication"]),
            authorization_policies=tuple(by["AuthorizationPolicy"]),
        )

    def all(self) -> list[Resource[Any]]:
        """Every resource, in load order."""
        items: list[Resource[Any]] = [
            *self.virtual_services,
            *self.destination_rules,
            *self.service_entries,
            *self.workload_entries,
            *self.peer_authentications,
            *self.authorization_policies,
        ]
        items.sort(key=lambda r: r.order)
        return items

    def __len__(self) -> int:
        return (
            len(self.virtual_services)
            + len(self.destination_rules)
            + len(self.service_entries)
            + len(self.workload_entries)
            + len(self.peer_authentications)
            + len(self.authorization_policies)
        )
