"""What of a snapshot this data plane does not act on yet, said once per feature.

Theory of operation: the translation (``control.istio``) is complete for every field the
validator accepts, but the data plane implements Istio's traffic policies in stages. Rather
than let a user believe a policy is in force when it is not, :func:`unsupported` scans an
applied snapshot once (off the event loop, with the build) and returns one warning per
unimplemented feature: how many routes / clusters use it and the first resource that does.

Applied today, so never reported: timeouts, retries (every ``retryOn`` token HTTP/1.1 can
produce), retry budgets, fault injection, mirroring, outlier detection, every
connection-pool limit and outbound TLS (``DISABLE``, ``SIMPLE``, ``MUTUAL``, ``ISTIO_MUTUAL``
and auto-mTLS, in ``meshproxy.upstream.pool``). Still reported: ``retryRemoteLocalities``
(endpoints carry no locality priorities here).
"""

from __future__ import annotations

from meshproxy.config.model import Meta, Snapshot


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
            if route.retries is not None and route.retries.retry_remote_localities:
                note("`retries.retryRemoteLocalities`", route.meta)
    return [
        f"not applied by this version of meshproxy: {feature}, set on {count} "
        f"{'entry' if count == 1 else 'entries'}, first in {first}"
        for feature, (count, first) in found.items()
    ]
