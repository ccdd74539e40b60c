"""Istio's standard request metrics plus ``meshproxy_*`` internals, rendered as Prometheus text.

Theory of operation
-------------------
``record_request`` runs once per request (tens of thousands of calls a second), so it does no
prometheus_client work and formats nothing: it finds the pre-rendered destination label string
for the :class:`~meshproxy.config.model.Cluster` (computed once per cluster object and cached by
``id``; the cache pins the object so an id is never reused while cached, and is cleared on every
snapshot swap), then bumps a plain list keyed by ``(destination labels, code, flags)``, found
through a second cache keyed by ``(id(cluster), code, flags)`` so the common case is one lookup:
``[count, duration_sum_ms, request_bytes_sum, response_bytes_sum, *bucket counts]``, the bucket
found with :func:`bisect.bisect_left` (Prometheus' ``le`` is "less than or equal").

At scrape time :meth:`Metrics.export` copies those lists into a JSON-able :data:`Export`;
:func:`merge_exports` sums several exports (one per worker process) and :func:`render` turns an
export into the Prometheus text exposition format (cumulative buckets, ``+Inf``, ``_sum``,
``_count``). The same renderer serves one process and the ``--workers`` supervisor, so the two
outputs cannot drift apart.

The cyclic garbage collector is watched too (:class:`GcStats`, a ``gc.callbacks`` hook that
:class:`~meshproxy.dataplane.DataPlane` installs while it runs): collections, total and longest
pause per generation. A collection holds the GIL, so it stalls every request in flight; with a
10,000-host snapshot one that rescans the snapshot takes a noticeable fraction of a second,
and these series are how such a stall is told from a slow upstream. The hook costs two
``perf_counter`` calls per collection, nothing per request.

Labels follow Istio's standard metrics (``reporter="source"`` on the outbound listener; unknown
values are ``"unknown"``). Source labels come from the proxy identity (``--namespace``,
``--labels app=...,version=...``); destination labels from the cluster: ``destination_service``
is its host, ``destination_version`` / ``destination_app`` the ``version`` / ``app`` label its
endpoints share (a subset's endpoints share them), else ``"unknown"``; the source reporter's
``connection_security_policy`` is ``unknown``, as in Istio. Requests the inbound listener served
are recorded by :meth:`Metrics.record_inbound` with ``reporter="destination"``: the source is
the verified peer (its SPIFFE id as ``source_principal``), the destination this workload, and
``connection_security_policy`` is ``mutual_tls`` or ``none``; their series are cached by
(peer, mTLS, code, flags), a handful of distinct keys.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshproxy.config.model import Cluster, ProxyIdentity, Snapshot

# Envoy's default histogram buckets, which Istio uses for request durations (milliseconds).
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
# Decades for request / response body sizes (bytes).
SIZE_BUCKETS: tuple[float, ...] = tuple(float(10**i) for i in range(10))  # 1 .. 1e9

_ND = len(DURATION_BUCKETS_MS) + 1  # + the +Inf slot
_NS = len(SIZE_BUCKETS) + 1
_DUR0 = 4  # offset of the first duration bucket in a series list
_REQ0 = _DUR0 + _ND
_RESP0 = _REQ0 + _NS
SERIES_LEN = _RESP0 + _NS

UNKNOWN = "unknown"

# The label names of Istio's standard metrics, in Istio's order.
SOURCE_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
)
DESTINATION_LABELS = (
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
)
REQUEST_LABELS = (
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
ISTIO_LABELS = SOURCE_LABELS + DESTINATION_LABELS + REQUEST_LABELS

# meshproxy internals: counters keyed by cluster name (name, help).
CLUSTER_COUNTERS: tuple[tuple[str, str], ...] = (
    ("meshproxy_upstream_connections_total", "Upstream connections opened, per cluster."),
    ("meshproxy_upstream_retries_total", "Request retries, per cluster."),
    ("meshproxy_upstream_overflows_total", "Requests refused by a connection pool limit (UO)."),
    (
        "meshproxy_upstream_retry_overflows_total",
        "Retries refused by the retry budget or maxRetries (the failure went to the client).",
    ),
    ("meshproxy_outlier_ejections_total", "Endpoints ejected by outlier detection."),
)

Export = dict[str, Any]
"""What :meth:`Metrics.export` returns and :func:`render` consumes (JSON-able)::

    {"requests": [[labels, code, flags, connection_security_policy, [series...]], ...],
     "counters": {family: {cluster_name: n}},
     "downstream_active": int,
     "config_versions": [version, ...],
     "reloads": {result: n},
     "gc": {"collections": [n0, n1, n2], "seconds": [s0, s1, s2], "longest": [l0, l1, l2]}}
"""

GC_GENERATIONS = 3


class GcStats:
    """A ``gc.callbacks`` hook: collections, pause seconds and longest pause per generation.

    Called by the interpreter at the start and the end of every cyclic collection (on
    whichever thread triggered it); :meth:`install` / :meth:`uninstall` add and remove it.
    """

    __slots__ = ("_t0", "collections", "longest", "seconds")

    def __init__(self) -> None:
        self.collections = [0] * GC_GENERATIONS
        self.seconds = [0.0] * GC_GENERATIONS
        self.longest = [0.0] * GC_GENERATIONS
        self._t0 = 0.0

    def __call__(self, phase: str, info: Mapping[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        g = info.get("generation", GC_GENERATIONS - 1)
        if not 0 <= g < GC_GENERATIONS:
            return
        dt = time.perf_counter() - self._t0
        self.collections[g] += 1
        self.seconds[g] += dt
        if dt > self.longest[g]:
            self.longest[g] = dt

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def export(self) -> dict[str, list[Any]]:
        return {
            "collections": list(self.collections),
            "seconds": list(self.seconds),
            "longest": list(self.longest),
        }

    def __repr__(self) -> str:
        return f"GcStats(collections={self.collections}, longest={self.longest})"


def _empty_gc() -> dict[str, list[Any]]:
    return GcStats().export()


def escape_label(value: str) -> str:
    """Escape a label value for the text format (backslash, double quote, newline)."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _labels(names: Iterable[str], values: Iterable[str]) -> str:
    return ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True))


def _common_label(cluster: Cluster, key: str) -> str | None:
    """The value of label ``key`` shared by every endpoint of ``cluster``, else None."""
    value: str | None = None
    for ep in cluster.endpoints:
        v = ep.labels.get(key)
        if v is None or (value is not None and v != value):
            return None
        value = v
    return value


def _workload(labels: Mapping[str, str]) -> tuple[str | None, str | None, str, str, str | None]:
    """(app, version, canonical service, canonical revision, workload) from pod labels."""
    app = labels.get("app") or labels.get("app.kubernetes.io/name")
    version = labels.get("version") or labels.get("app.kubernetes.io/version")
    canonical = labels.get("service.istio.io/canonical-name") or app or UNKNOWN
    revision = labels.get("service.istio.io/canonical-revision") or version or "latest"
    workload = labels.get("workload") or app
    return app, version, canonical, revision, workload


def source_labels(proxy: ProxyIdentity, principal: str | None = None) -> str:
    """The ``reporter="source"`` and ``source_*`` labels for this proxy, rendered once
    (``principal``: this workload's SPIFFE id once it has a certificate)."""
    app, version, canonical, revision, workload = _workload(proxy.labels)
    return _labels(
        SOURCE_LABELS,
        (
            "source",
            workload or UNKNOWN,
            canonical,
            revision,
            proxy.namespace or UNKNOWN,
            principal or UNKNOWN,
            app or UNKNOWN,
            version or UNKNOWN,
            UNKNOWN,  # source_cluster
        ),
    )


def inbound_labels(proxy: ProxyIdentity, own: str | None, peer: str | None) -> str:
    """Every label but the request ones for a request the inbound listener served
    (``reporter="destination"``): the source is the verified peer (``peer``, its SPIFFE id, or
    None on plaintext: all ``unknown``; no peer metadata exchange, so only the namespace is
    known from the id), the destination this workload (``own`` its SPIFFE id).
    ``destination_service`` is ``<app>.<namespace>.svc.cluster.local`` from the ``app``
    label (Istio names the service the inbound cluster serves)."""
    app, version, canonical, revision, workload = _workload(proxy.labels)
    peer_ns = None
    if peer:
        rest = peer.partition("/ns/")[2]
        peer_ns = rest.partition("/")[0] or None
    ns = proxy.namespace or UNKNOWN
    service = f"{app}.{ns}.svc.cluster.local" if app else UNKNOWN
    source = _labels(
        SOURCE_LABELS,
        ("destination", UNKNOWN, UNKNOWN, "latest", peer_ns or UNKNOWN, peer or UNKNOWN)
        + (UNKNOWN,) * 3,
    )
    dest = _labels(
        DESTINATION_LABELS,
        (
            workload or UNKNOWN,
            ns,
            own or UNKNOWN,
            app or UNKNOWN,
            version or UNKNOWN,
            service,
            canonical,
            revision,
            app or UNKNOWN,
            ns,
            UNKNOWN,  # destination_cluster
        ),
    )
    return f"{source},{dest}"


def destination_labels(cluster: Cluster | None) -> str:
    """The ``destination_*`` labels for a cluster (all ``unknown`` without one, e.g. NR)."""
    if cluster is None:
        values: tuple[str, ...] = (UNKNOWN,) * 7 + ("latest",) + (UNKNOWN,) * 3
        return _labels(DESTINATION_LABELS, values)
    app = _common_label(cluster, "app")
    version = _common_label(cluster, "version")
    canonical = _common_label(cluster, "service.istio.io/canonical-name") or app
    revision = _common_label(cluster, "service.istio.io/canonical-revision") or version
    service_name = cluster.service_name or cluster.host.split(".", 1)[0] or UNKNOWN
    return _labels(
        DESTINATION_LABELS,
        (
            UNKNOWN,  # destination_workload
            cluster.service_namespace or UNKNOWN,
            UNKNOWN,  # destination_principal
            app or UNKNOWN,
            version or UNKNOWN,
            cluster.host or UNKNOWN,
            canonical or service_name,
            revision or "latest",
            service_name,
            cluster.service_namespace or UNKNOWN,
            UNKNOWN,  # destination_cluster
        ),
    )


_NO_CLUSTER_LABELS = destination_labels(None)


def _observe(s: list[float], duration_s: float, request_bytes: int, response_bytes: int) -> None:
    ms = duration_s * 1000.0
    s[0] += 1
    s[1] += ms
    s[2] += request_bytes
    s[3] += response_bytes
    s[_DUR0 + bisect_left(DURATION_BUCKETS_MS, ms)] += 1
    s[_REQ0 + (bisect_left(SIZE_BUCKETS, request_bytes) if request_bytes else 0)] += 1
    s[_RESP0 + bisect_left(SIZE_BUCKETS, response_bytes)] += 1


class Metrics:
    """The process's metrics. See the module docstring; the data plane calls
    :meth:`record_request`, :meth:`upstream_connection_opened` and
    :meth:`downstream_connections`; admin calls :meth:`export` / :meth:`render`."""

    __slots__ = (
        "_dest_cache",
        "_inbound",
        "_principal",
        "_proxy",
        "_series",
        "_source",
        "config_version",
        "counters",
        "downstream_active",
        "gc",
        "mirror_stats",
        "reloads",
        "requests",
    )

    def __init__(self, proxy: ProxyIdentity | None = None) -> None:
        self._proxy = proxy or ProxyIdentity()
        self._principal: str | None = None
        self._source = source_labels(self._proxy)
        self._dest_cache: dict[int, tuple[Cluster, str]] = {}
        self._series: dict[tuple[int, int, str], list[float]] = {}  # by (id(cluster), ...)
        # inbound: by (verified peer or None, mutual TLS?, code, flags)
        self._inbound: dict[tuple[str | None, bool, int, str], list[float]] = {}
        # every series, by (labels but the request ones, code, flags, security policy)
        self.requests: dict[tuple[str, int, str, str], list[float]] = {}
        self.counters: dict[str, dict[str, int]] = {name: {} for name, _ in CLUSTER_COUNTERS}
        self.downstream_active = 0
        self.config_version: str | None = None
        self.reloads: dict[str, int] = {"success": 0, "rejected": 0}
        self.gc = GcStats()  # counts only while installed (DataPlane does, while it runs)
        # set by the data plane: the mirrorer's counters (sent/completed/failed/dropped)
        self.mirror_stats: Callable[[], dict[str, int]] | None = None

    # ------------------------------------------------------------------ hot path

    def record_request(
        self,
        cluster: Cluster | None,
        code: int,
        flags: str,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """Called by the data plane once per finished outbound request (flags ``"-"`` when
        none): ``reporter="source"``."""
        s = self._series.get((id(cluster), code, flags))
        if s is None:
            s = self._new_series(cluster, code, flags)
        # _observe inlined: this runs once per outbound request (a call is ~0.2 us here)
        ms = duration_s * 1000.0
        s[0] += 1
        s[1] += ms
        s[2] += request_bytes
        s[3] += response_bytes
        s[_DUR0 + bisect_left(DURATION_BUCKETS_MS, ms)] += 1
        s[_REQ0 + (bisect_left(SIZE_BUCKETS, request_bytes) if request_bytes else 0)] += 1
        s[_RESP0 + bisect_left(SIZE_BUCKETS, response_bytes)] += 1

    def record_inbound(
        self,
        peer: str | None,
        mtls: bool,
        code: int,
        flags: str,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """Called once per request the inbound listener finished: ``reporter="destination"``,
        the source being ``peer`` (the verified SPIFFE id, None on plaintext) and
        ``connection_security_policy`` ``mutual_tls`` or ``none``."""
        key = (peer, mtls, code, flags)
        s = self._inbound.get(key)
        if s is None:
            labels = inbound_labels(self._proxy, self._principal, peer)
            s = self._row(labels, code, flags, "mutual_tls" if mtls else "none")
            self._inbound[key] = s
        _observe(s, duration_s, request_bytes, response_bytes)

    def set_principal(self, principal: str | None) -> None:
        """This workload's SPIFFE id (from its certificate): ``source_principal`` of the
        outbound series and ``destination_principal`` of the inbound ones from now on."""
        if principal == self._principal:
            return
        self._principal = principal
        self._source = source_labels(self._proxy, principal)
        self._series.clear()
        self._inbound.clear()

    def _row(self, labels: str, code: int, flags: str, security: str) -> list[float]:
        key = (labels, code, flags, security)
        s = self.requests.get(key)
        if s is None:
            s = self.requests[key] = [0] * SERIES_LEN
        return s

    def _new_series(self, cluster: Cluster | None, code: int, flags: str) -> list[float]:
        """The series for a (cluster object, code, flags) seen for the first time since the
        last snapshot swap; several cluster objects may share one series (same labels)."""
        if cluster is None:
            dest = _NO_CLUSTER_LABELS
        else:
            cached = self._dest_cache.get(id(cluster))
            if cached is None or cached[0] is not cluster:
                dest = destination_labels(cluster)
                self._dest_cache[id(cluster)] = (cluster, dest)
            else:
                dest = cached[1]
        # Istio's source reporter does not know the connection's security: "unknown"
        s = self._row(f"{self._source},{dest}", code, flags, UNKNOWN)
        # keyed by id(): _dest_cache pins the cluster, so the id is not reused while cached
        self._series[(id(cluster), code, flags)] = s
        return s

    def upstream_connection_opened(self, cluster_name: str) -> None:
        """Called by the connection pool each time it opens an upstream connection."""
        self._bump("meshproxy_upstream_connections_total", cluster_name)

    def downstream_connections(self, delta: int) -> None:
        """Called by the listener with +1 on accept and -1 on close."""
        self.downstream_active += delta

    def upstream_retry(self, cluster_name: str) -> None:
        """Called by the attempt loop for each retry it makes."""
        self._bump("meshproxy_upstream_retries_total", cluster_name)

    def upstream_overflow(self, cluster_name: str) -> None:
        """Called when a connection pool limit refuses a request (UO)."""
        self._bump("meshproxy_upstream_overflows_total", cluster_name)

    def upstream_retry_overflow(self, cluster_name: str) -> None:
        """Called when the retry budget / ``maxRetries`` refuses a retry."""
        self._bump("meshproxy_upstream_retry_overflows_total", cluster_name)

    def outlier_ejection(self, cluster_name: str) -> None:
        """Called by outlier detection for each endpoint it ejects."""
        self._bump("meshproxy_outlier_ejections_total", cluster_name)

    def _bump(self, family: str, cluster_name: str) -> None:
        d = self.counters[family]
        d[cluster_name] = d.get(cluster_name, 0) + 1

    def forget_cluster(self, cluster_name: str) -> None:
        """Drop a cluster's per-cluster counters (a cluster the data plane made itself and
        forgot, e.g. an evicted inbound port's: its series end instead of piling up)."""
        for d in self.counters.values():
            d.pop(cluster_name, None)

    # ------------------------------------------------------------------ config

    def config_reload(self, result: str) -> None:
        """Called by the config source after each reload attempt (``success``/``rejected``)."""
        self.reloads[result] = self.reloads.get(result, 0) + 1

    def on_snapshot(self, old: Snapshot, new: Snapshot) -> None:
        """State listener: a new snapshot brings new Cluster objects; drop the label cache so
        old clusters are not pinned, and remember the version for ``config_version_info``."""
        self._dest_cache.clear()
        self._series.clear()
        self.config_version = new.version

    # ------------------------------------------------------------------ scrape

    def export(self) -> Export:
        return {
            "requests": [[d, c, f, p, list(s)] for (d, c, f, p), s in self.requests.items()],
            "counters": {k: dict(v) for k, v in self.counters.items()},
            "downstream_active": self.downstream_active,
            "config_versions": [] if self.config_version is None else [self.config_version],
            "reloads": dict(self.reloads),
            "gc": self.gc.export(),
            "mirror": self.mirror_stats() if self.mirror_stats is not None else {},
        }

    def render(self) -> str:
        return render(self.export())


def merge_exports(exports: Iterable[Export]) -> Export:
    """Sum several exports (one per worker): counters and histograms by label set."""
    out: Export = {
        "requests": [],
        "counters": {name: {} for name, _ in CLUSTER_COUNTERS},
        "downstream_active": 0,
        "config_versions": [],
        "reloads": {},
        "gc": _empty_gc(),
        "mirror": {},
    }
    requests: dict[tuple[str, int, str, str], list[float]] = {}
    for ex in exports:
        for labels, code, flags, security, series in ex["requests"]:
            key = (labels, int(code), flags, security)
            acc = requests.get(key)
            if acc is None:
                requests[key] = list(series)
            else:
                for i, v in enumerate(series):
                    acc[i] += v
        for family, per_cluster in ex["counters"].items():
            acc_c = out["counters"].setdefault(family, {})
            for name, n in per_cluster.items():
                acc_c[name] = acc_c.get(name, 0) + n
        out["downstream_active"] += ex["downstream_active"]
        for v in ex["config_versions"]:
            if v not in out["config_versions"]:
                out["config_versions"].append(v)
        for result, n in ex["reloads"].items():
            out["reloads"][result] = out["reloads"].get(result, 0) + n
        for result, n in ex.get("mirror", {}).items():
            out["mirror"][result] = out["mirror"].get(result, 0) + n
        g = ex.get("gc")
        if g:
            acc_g = out["gc"]
            for i in range(GC_GENERATIONS):
                acc_g["collections"][i] += g["collections"][i]
                acc_g["seconds"][i] += g["seconds"][i]
                acc_g["longest"][i] = max(acc_g["longest"][i], g["longest"][i])
    out["requests"] = [[d, c, f, p, s] for (d, c, f, p), s in requests.items()]
    return out


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _le(bound: float) -> str:
    return _num(bound) if bound < 1e21 else repr(float(bound))


def _histogram(
    lines: list[str],
    name: str,
    labels: str,
    buckets: tuple[float, ...],
    counts: list[float],
    total: float,
    count: float,
) -> None:
    cumulative = 0.0
    for bound, n in zip(buckets, counts, strict=False):
        cumulative += n
        lines.append(f'{name}_bucket{{{labels},le="{_le(bound)}"}} {_num(cumulative)}')
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {_num(count)}')
    lines.append(f"{name}_sum{{{labels}}} {_num(total)}")
    lines.append(f"{name}_count{{{labels}}} {_num(count)}")


def render(ex: Export) -> str:
    """The Prometheus text exposition (format 0.0.4) of an export."""
    rows = []
    for labels, code, flags, security, series in ex["requests"]:
        tail = (
            f'request_protocol="http",response_code="{code}",grpc_response_status="",'
            f'response_flags="{escape_label(flags)}",connection_security_policy="{security}"'
        )
        rows.append((f"{labels},{tail}", series))
    rows.sort(key=lambda r: r[0])

    lines: list[str] = []
    lines.append("# HELP istio_requests_total Requests handled by this proxy.")
    lines.append("# TYPE istio_requests_total counter")
    for labels, s in rows:
        lines.append(f"istio_requests_total{{{labels}}} {_num(s[0])}")
    for name, help_, buckets, sum_i, first in (
        (
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds.",
            DURATION_BUCKETS_MS,
            1,
            _DUR0,
        ),
        ("istio_request_bytes", "Request body sizes in bytes.", SIZE_BUCKETS, 2, _REQ0),
        ("istio_response_bytes", "Response body sizes in bytes.", SIZE_BUCKETS, 3, _RESP0),
    ):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} histogram")
        for labels, s in rows:
            counts = s[first : first + len(buckets)]
            _histogram(lines, name, labels, buckets, counts, s[sum_i], s[0])

    for family, help_ in CLUSTER_COUNTERS:
        lines.append(f"# HELP {family} {help_}")
        lines.append(f"# TYPE {family} counter")
        per_cluster: Mapping[str, int] = ex["counters"].get(family, {})
        for cluster_name in sorted(per_cluster):
            n = per_cluster[cluster_name]
            lines.append(f'{family}{{cluster="{escape_label(cluster_name)}"}} {_num(n)}')

    lines.append(
        "# HELP meshproxy_downstream_connections_active Open downstream (client) connections."
    )
    lines.append("# TYPE meshproxy_downstream_connections_active gauge")
    lines.append(f"meshproxy_downstream_connections_active {_num(ex['downstream_active'])}")

    lines.append("# HELP meshproxy_config_version_info The applied config version (value 1).")
    lines.append("# TYPE meshproxy_config_version_info gauge")
    for version in ex["config_versions"]:
        lines.append(f'meshproxy_config_version_info{{version="{escape_label(version)}"}} 1')

    lines.append("# HELP meshproxy_config_reloads_total Config reload attempts by result.")
    lines.append("# TYPE meshproxy_config_reloads_total counter")
    for result in sorted(ex["reloads"]):
        n = ex["reloads"][result]
        lines.append(f'meshproxy_config_reloads_total{{result="{escape_label(result)}"}} {n}')

    lines.append(
        "# HELP meshproxy_mirror_requests_total Mirrored (shadow) request copies by outcome:"
        " sent = completed + failed + in flight; dropped copies were never sent."
    )
    lines.append("# TYPE meshproxy_mirror_requests_total counter")
    mirror = ex.get("mirror") or {}
    for result in ("sent", "completed", "failed", "dropped"):
        lines.append(
            f'meshproxy_mirror_requests_total{{result="{result}"}} {mirror.get(result, 0)}'
        )

    g = ex.get("gc") or _empty_gc()
    for family, kind, key, help_ in (
        ("meshproxy_gc_collections_total", "counter", "collections", "Cyclic GC collections."),
        (
            "meshproxy_gc_pause_seconds_total",
            "counter",
            "seconds",
            "Time spent in cyclic GC collections (the event loop is stalled meanwhile).",
        ),
        (
            "meshproxy_gc_longest_pause_seconds",
            "gauge",
            "longest",
            "The longest single cyclic GC collection (max over workers).",
        ),
    ):
        lines.append(f"# HELP {family} {help_}")
        lines.append(f"# TYPE {family} {kind}")
        for gen in range(GC_GENERATIONS):
            lines.append(f'{family}{{generation="{gen}"}} {_num(g[key][gen])}')
    return "\n".join(lines) + "\n"
