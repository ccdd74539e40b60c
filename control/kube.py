"""``meshproxy control --kubernetes``: the Kubernetes API as the control plane's config source.

Theory of operation
-------------------
:class:`KubeSource` runs one :class:`~control.kube_watch.Reflector` (list, then watch from the
list's resourceVersion, bookmarks, relist on 410, reconnect with backoff) per watched kind
(:data:`~control.kube_watch.KINDS`: the six Istio kinds, Services, EndpointSlices, Pods) and per
``--namespace`` (none: the cluster-wide collections). Every change sets a flag; the
:meth:`KubeSource.run` loop waits until changes have been quiet for ``debounce`` seconds (at
most ``max_delay`` after the first one, so a steady churn still gets through), takes a
snapshot of every reflector's objects (shallow copies: reflectors replace objects, never
mutate them) and calls :meth:`control.server.ControlPlane.reload`, exactly as the file watcher
does. A burst of events therefore gives one load, and a load whose content did not change
(a Pod's status, a relist of the same objects) gives the same version and pushes nothing.

:class:`KubeStore` is the :class:`~control.store.DocumentSource` the control plane loads
from, in a worker thread: :func:`control.kube_registry.documents_of` turns the snapshot into
documents (Istio objects as their files would hold them; each Service, with its
EndpointSlices and Pods, as a ServiceEntry -- see that module for the exact mapping), and
each document goes through the file source's decoder and validator
(:func:`control.istio.load.load_documents`) under the name ``k8s://Kind/NS/NAME``, so a
problem reads ``k8s://VirtualService/default/reviews: VirtualService/reviews: spec...: msg``.
Unlike files (all or nothing), an invalid Istio object is *dropped*, as istiod does: an object
that does not validate on its own, then one that fails a cross-resource check (a route to a
subset no DestinationRule defines), is left out and reported in ``/status`` ``errors`` (logged
once, by the control plane), and everything else is validated, versioned and pushed -- one bad
object in one namespace must not freeze every sidecar's Services and endpoints, nor keep a
restarted control plane without a config. The dropped set is a function of the content, so the
same content still gives the same version. A document derived from a Kubernetes Service that
does not validate is skipped with a warning (a Service is not mesh configuration). Validation is
reused per document while its content is unchanged.
The version is :func:`control.protocol.config_version` over the documents' digests in load
order: the same cluster content gives the same version, also across restarts.

Pods serve the registry only (endpoint labels and service accounts). A proxy's namespace and
labels stay the ones of its ``hello`` (the injector passes the Pod's): the proxy translates
with that identity, so scoping its documents with another one (say, the Pod's labels edited
since) would break :mod:`control.scope`'s invariant.

A collection that cannot be listed -- 403 (missing RBAC), 404 (an Istio CRD not installed:
tolerated, taken as empty) -- or keeps failing is reported, while it lasts, in ``/status``
``errors`` (and so by ``meshproxy status``) and, before the first config, in ``/ready``'s 503
body (:meth:`KubeSource.problems`), not only in the log.

Its metrics join the control plane's ``/metrics`` (a collector read at scrape time, nothing
counted twice): ``meshproxy_control_k8s_events_total{kind,event}`` and, per kind, ``lists``
(first list and relists), ``watches``, ``gone`` (410s), ``errors`` and ``bookmarks``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from control.istio.load import load_documents, paused_gc
from control.istio.resources import Resource
from control.istio.validate import ValidationReport
from control.kube_registry import CLUSTER_DOMAIN, documents_of
from control.kube_watch import KINDS, KubeClient, KubeError, Reflector, ReflectorSettings
from control.store import LoadOutcome, assemble

log = logging.getLogger("meshproxy.control.kube")

__all__ = ["KubeSource", "KubeStore", "open_source", "slim_pod"]

Objects = dict[str, dict[str, dict[str, Any]]]  # kind -> "ns/name" -> object


def slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """What the registry reads from a Pod: name, namespace, labels, service account. Without
    ``resourceVersion`` or ``status``, so a Pod's status updates leave it equal and cause no
    reload (the reflector drops a MODIFIED event whose kept object did not change)."""
    meta = pod.get("metadata")
    spec = pod.get("spec")
    meta = meta if isinstance(meta, dict) else {}
    out: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels") if k in meta},
    }
    if isinstance(spec, dict) and "serviceAccountName" in spec:
        out["spec"] = {"serviceAccountName": spec["serviceAccountName"]}
    return out


@dataclass(slots=True)
class _Doc:
    document: dict[str, Any]
    resource: Resource[Any] | None
    problems: list[str]
    warnings: list[str]


class KubeStore:
    """Validated, versioned configs from snapshots of the watched objects."""

    def __init__(self, domain: str = CLUSTER_DOMAIN) -> None:
        self.domain = domain
        self.objects: Mapping[str, Mapping[str, dict[str, Any]]] = {}  # set before each load
        self.parsed = 0
        self._docs: dict[str, _Doc] = {}

    def load(self) -> LoadOutcome:
        objects = self.objects  # one reference: the source replaces it, never mutates it
        report = ValidationReport()
        pairs: list[tuple[Resource[Any], dict[str, Any]]] = []
        cache: dict[str, _Doc] = {}
        self.parsed = 0
        with paused_gc():
            sources = documents_of(objects, self.domain)
            for src in sources:
                got = self._docs.get(src.name)
                if got is None or got.document != src.document:
                    self.parsed += 1
                    own = ValidationReport()
                    loaded = load_documents(src.name, [src.document], own)
                    got = _Doc(src.document, loaded[0] if loaded else None, own.problems,
                               own.warnings)  # fmt: skip
                cache[src.name] = got
                if src.derived and got.problems:
                    report.warnings.extend(f"{p} (Service skipped)" for p in got.problems)
                    continue
                report.problems.extend(got.problems)
                report.warnings.extend(got.warnings)
                if got.resource is not None and not got.problems:  # invalid: dropped alone
                    pairs.append((got.resource, src.document))
            self._docs = cache
            return assemble(pairs, report, len(sources), drop_invalid=True)

    def __repr__(self) -> str:
        return f"KubeStore(documents={len(self._docs)})"


class KubeSource:
    """The reflectors of every watched kind and the debounced reloads they cause."""

    def __init__(
        self,
        client: KubeClient,
        namespaces: Sequence[str] = (),
        *,
        debounce: float = 0.1,
        max_delay: float = 2.0,
        settings: ReflectorSettings | None = None,
        store: KubeStore | None = None,
    ) -> None:
        self.client = client
        self.namespaces = list(dict.fromkeys(namespaces))
        self.debounce = debounce
        self.max_delay = max(max_delay, debounce)
        self.store = store or KubeStore()
        self.reflectors = [
            Reflector(
                client,
                kind,
                ns,
                self._on_event,
                settings,
                transform=slim_pod if kind.kind == "Pod" else None,
            )
            for kind in KINDS
            for ns in (self.namespaces or [None])
        ]
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()
        self.on_event: Callable[[str, str, str, dict[str, Any]], None] | None = None  # tests

    def __repr__(self) -> str:
        return f"KubeSource({self.client.host}, namespaces={self.namespaces or 'all'})"

    def _on_event(self, kind: str, typ: str, key: str, obj: dict[str, Any]) -> None:
        self.events[(kind, typ)] += 1
        log.debug("%s %s %s", typ, kind, key)
        self._changed.set()
        if self.on_event is not None:
            self.on_event(kind, typ, key, obj)

    def start(self) -> None:
        for r in self.reflectors:
            self._tasks.append(asyncio.create_task(r.run(), name=f"reflector {r.path}"))

    async def synced(self) -> None:
        """Until every reflector's first list is in."""
        await asyncio.gather(*(r.synced.wait() for r in self.reflectors))

    def problems(self) -> list[str]:
        """The reflectors' current trouble (:meth:`~control.kube_watch.Reflector.problem`)."""
        return [p for r in self.reflectors if (p := r.problem()) is not None]

    def snapshot(self) -> Objects:
        out: Objects = {}
        for r in self.reflectors:
            out.setdefault(r.kind.kind, {}).update(r.objects)
        return out

    def collect(self) -> Iterator[Metric]:
        """The source's metrics, read at scrape time (a prometheus_client collector)."""
        events = CounterMetricFamily(
            "meshproxy_control_k8s_events",
            "Changes seen per kind and type, relists included (pilot_k8s_reg_events, "
            "pilot_k8s_cfg_events)",
            labels=["kind", "event"],
        )
        for (kind, typ), n in sorted(self.events.items()):
            if typ != "SYNCED":
                events.add_metric([kind, typ.lower()], n)
        yield events
        per_kind = {
            "lists": ("Lists per kind: the first one and each relist", "lists"),
            "watches": ("Watch requests per kind (reconnects included)", "watches"),
            "gone": ("410 Gone answers per kind (each causes a relist)", "gone"),
            "errors": ("Failed list/watch requests per kind (retried with backoff)", "errors"),
            "bookmarks": ("BOOKMARK events per kind", "bookmarks"),
        }
        for name, (help_text, attr) in per_kind.items():
            m = CounterMetricFamily(f"meshproxy_control_k8s_{name}", help_text, labels=["kind"])
            totals: collections.Counter[str] = collections.Counter()
            for r in self.reflectors:
                totals[r.kind.kind] += getattr(r, attr)
            for kind, n in totals.items():
                m.add_metric([kind], n)
            yield m

    async def run(self, cp: Any) -> None:
        """Reload ``cp`` (a :class:`control.server.ControlPlane` whose store is ours) after the
        first sync and after every debounced burst of changes, until cancelled. The source's
        metrics join ``cp``'s ``/metrics``."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError):  # already registered (run again)
            cp.metrics.registry.register(self)
        cp.source_problems = self.problems  # /status errors and /ready say why
        await self.synced()
        while True:
            first = loop.time()
            while True:  # quiet for `debounce`, or `max_delay` since the burst began
                self._changed.clear()
                wait = min(self.debounce, first + self.max_delay - loop.time())
                if wait <= 0:
                    break
                try:  # not wait_for: on 3.11 it loses a cancel that comes with the event
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
                except TimeoutError:
                    break
            self.store.objects = self.snapshot()
            try:
                await cp.reload()
            except Exception:  # a bug must not stop the source
                log.exception("reload failed")
            await self._changed.wait()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.client.close()


async def open_source(ns: argparse.Namespace) -> KubeSource:
    """The source ``meshproxy control --kubernetes`` asked for (a config that cannot be loaded:
    :class:`meshproxy.cli.UsageError`)."""
    from meshproxy.cli import UsageError

    try:
        client = await KubeClient.create(ns.kubeconfig, ns.context)
    except KubeError as e:
        raise UsageError(str(e)) from None
    log.info(
        "Kubernetes API %s, watching %s",
        client.host,
        ", ".join(ns.namespace) if ns.namespace else "all namespaces",
    )
    return KubeSource(client, ns.namespace or (), debounce=ns.debounce)
