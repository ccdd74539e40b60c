"""What of a snapshot this data plane does not act on yet, said once per feature.

Theory of operation: the translation (``control.istio``) is complete for every field the
validator accepts, but the data plane implements Istio's traffic policies in stages. Rather
than let a user believe a fault, retry policy or circuit breaker is in force when it is not,
:func:`unsupported` scans an applied snapshot once (off the event loop, with the build) and
returns one warning per unimplemented feature: how many routes / clusters use it and the first
resource that does. Istio's *default* retry policy (present on every route without a
``retries`` block) is not reported: only settings the user wrote.
"""

from __future__ import annotations

from meshproxy.config.model import (
    DEFAULT_RETRY,
    ConnectionPool,
    Meta,
    Snapshot,
    TlsMode,
)

_POOL = ConnectionPool()
# connect_timeout, idle_timeout and max_requests_per_connection are honoured today
_BREAKER_FIELDS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


def _where(meta: Meta | None) -> str:
    if meta is None:
        return "a generated entry"
    where = f"{meta.kind}/{meta.namespace}/{meta.name}"
    if meta.path:
        where += f" {meta.path}"
    if meta.file:
        where += f" ({meta.file})"
    return where


def unsupported(snapshot: Snapshot) -> list[str]:
    """One line per feature ``snapshot`` configures that this data plane does not apply."""
    found: dict[str, tuple[int, str]] = {}

    def note(feature: str, meta: Meta | None) -> None:
        count, first = found.get(feature, (0, ""))
        found[feature] = (count + 1, first or _where(meta))

    seen_vh: set[int] = set()
    vhosts = [*snapshot.routes.exact.values(), *snapshot.routes.wildcards.values()]
    if snapshot.routes.catch_all is not None:
        vhosts.append(snapshot.routes.catch_all)
    for vh in vhosts:
        if id(vh) in seen_vh:  # aliases share one virtual host
            continue
        seen_vh.add(id(vh))
        for route in vh.routes:
            if route.fault is not None:
                note("route fault injection (`fault`)", route.meta)
            if route.timeout is not None:
                note("route `timeout`", route.meta)
            if route.retries is not None and route.retries != DEFAULT_RETRY:
                note("route `retries`", route.meta)
            if route.mirrors:
                note("request mirroring (`mirror` / `mirrors`)", route.meta)
    for cluster in snapshot.clusters.values():
        meta = cluster.policy_meta or cluster.meta
        if cluster.outlier is not None:
            note("outlier detection (`outlierDetection`)", meta)
        pool = cluster.pool
        if any(getattr(pool, f) != getattr(_POOL, f) for f in _BREAKER_FIELDS):
            note("connection-pool circuit breaking (`connectionPool` limits)", meta)
        if cluster.tls is not None and cluster.tls.mode is not TlsMode.DISABLE:
            note(f"upstream TLS (`tls.mode: {cluster.tls.mode.value}`)", meta)
    return [
        f"not applied by this version of meshproxy: {feature}, set on {count} "
        f"{'entry' if count == 1 else 'entries'}, first in {first}"
        for feature, (count, first) in found.items()
    ]
