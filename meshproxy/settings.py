"""Every deadline and limit of the data plane, named once, with its default.

Theory of operation: components receive a :class:`Settings` (frozen) from the composition root
(``meshproxy.app``) instead of reading constants of their own, so a test can shrink any
deadline and a reader can see every wait the proxy has in one place ("every wait has a
deadline").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    # downstream (client side)
    max_head_bytes: int = 60 * 1024  # request head larger than this: 431 (Envoy's default)
    max_headers: int = 100  # more header fields than this: 431 (Envoy's default)
    head_read_timeout: float = 10.0  # from first byte of a request to the end of its head
    downstream_idle_timeout: float = 60.0  # idle keep-alive client connection is closed
    # a request with no byte moving either way for this long ends (Envoy's HCM
    # stream_idle_timeout, 5 min): 408 "stream timeout" (flag SI), or a reset once the
    # response started. The deadline of every wait the route's timeouts leave open.
    stream_idle_timeout: float = 300.0
    # a TCP passthrough tunnel with no byte moving either way for this long is closed
    # (Envoy's tcp_proxy idle_timeout, 1 h)
    tcp_idle_timeout: float = 3600.0
    # inbound listener: a new connection's first byte tells TLS from plaintext; a client
    # that sends nothing for this long is closed (Envoy's listener_filters_timeout, 15 s)
    first_byte_timeout: float = 15.0
    # transparent capture: distinct original ports the inbound listener keeps a context (and a
    # pool) for; past it the least recently used idle one is evicted, or, all busy, a
    # connection to a new port is closed
    max_inbound_ports: int = 256
    tls_handshake_timeout: float = 10.0  # inbound mTLS handshake deadline
    cert_poll_interval: float = 1.0  # --cert-dir files are checked for changes this often
    # upstream (server side)
    upstream_idle_timeout: float = 60.0  # idle pooled upstream connection is closed
    max_idle_per_endpoint: int = 256  # idle connections kept per endpoint
    retry_buffer_bytes: int = 1024 * 1024  # request bodies up to this are replayable
    retry_backoff_base: float = 0.025  # Envoy's default base interval (full jitter)
    retry_backoff_max: float = 0.250  # Envoy's default: 10 x base
    # beyond Istio: a route without a `retries` block also retries a 503 answer to an
    # idempotent request (GET HEAD OPTIONS TRACE PUT DELETE), never a POST or PATCH
    default_retry_503: bool = True
    # the retry budget of clusters whose DestinationRule sets none (Istio has no default
    # budget; 0 percent = only the minimum concurrency); None = no default budget
    retry_budget_percent: float | None = 20.0
    retry_budget_min: int = 3
    # outlier detection: a pool smaller than 100 / maxEjectionPercent endpoints may still eject
    # this many (Envoy ejects none there); 0 = Envoy's behaviour exactly
    outlier_min_ejectable: int = 1
    mirror_max_inflight: int = 1024  # concurrent mirror requests; more are dropped and counted
    mirror_timeout: float = 10.0  # a mirror's deadline when its route has no `timeout`
    # a redirected request (meshproxy capture) whose Host and original destination match no
    # service: ALLOW_ANY forwards it there (PassthroughCluster), REGISTRY_ONLY answers 502
    # (Istio's meshConfig.outboundTrafficPolicy.mode, default ALLOW_ANY)
    outbound_traffic_policy: str = "ALLOW_ANY"
    # lifecycle
    drain_seconds: float = 5.0
    # a stopping sidecar (--inbound) exits once no connection is open, but not before this
    # (Istio's MINIMUM_DRAIN_DURATION) and at drain_seconds in any case; see lifecycle.py
    min_drain_seconds: float = 5.0
    app_check_interval: float = 0.5  # --exit-with-app: how often the app's port/pid is checked
    reload_debounce: float = 0.1  # quiet time after a config file change before reloading
    control_heartbeat: float = 15.0  # WebSocket ping interval on the control-plane stream
    # write-side flow control (bytes buffered in a transport before we pause the other side)
    high_water: int = 256 * 1024
    low_water: int = 64 * 1024


DEFAULT_SETTINGS = Settings()
