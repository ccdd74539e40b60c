"""Kubernetes objects -> the Istio documents the file source would parse (pure, no I/O).

Theory of operation
-------------------
The Kubernetes config source (:mod:`control.kube`) keeps the objects it watches in memory and,
for every new config, turns them into a list of :class:`Source` documents with
:func:`documents_of`. The documents are then validated and versioned exactly like files
(:class:`control.kube.KubeStore`), so the translation, the scoping and the pushes see the same
shapes whichever source fed them.

**Istio objects** (VirtualService, DestinationRule, ServiceEntry, WorkloadEntry,
PeerAuthentication, AuthorizationPolicy) become ``{apiVersion, kind, metadata, spec}`` with
``metadata`` cut to ``name``, ``namespace``, ``labels`` and ``annotations`` (without
``kubectl.kubernetes.io/last-applied-configuration``). ``resourceVersion``, ``uid``,
``managedFields`` and ``status`` are dropped, so a status-only write or a relist of the same
objects gives byte-identical documents and therefore the same config version (the version is
content-derived, also across restarts).

**Kubernetes Services** become one ServiceEntry-equivalent document each, named after the
Service, in its namespace, whose source is ``k8s://Service/NS/NAME``:

* ``hosts``: ``NAME.NS.svc.cluster.local``; ``addresses``: ``spec.clusterIPs`` (else
  ``spec.clusterIP``) without ``None`` (headless Services have no address);
  ``location: MESH_INTERNAL`` (auto-mTLS applies, as for Istio's Kubernetes registry);
  ``resolution: STATIC``.
* ``ports``: one per TCP Service port (UDP/SCTP ports are skipped: the sidecar proxies TCP).
  ``number`` = ``port``; ``name`` = the port's name, or ``port-NUMBER`` for an unnamed single
  port (Istio's ServiceEntry names must be DNS labels); ``targetPort`` = a numeric
  ``targetPort`` (a named one is resolved per endpoint, below). ``protocol`` follows Istio's
  protocol selection: ``appProtocol`` first (``kubernetes.io/h2c`` -> HTTP2,
  ``kubernetes.io/ws``/``wss`` -> HTTP, else its prefix), then the port name's prefix before
  the first ``-`` (``http-web`` -> HTTP, ``grpc-web*`` -> GRPC-WEB, ``tcp-db`` -> TCP...);
  a name Istio does not recognise leaves ``protocol`` unset (Istio's auto-detection; the
  translation then treats the port as HTTP).
* ``endpoints``: every address of every EndpointSlice labelled
  ``kubernetes.io/service-name: NAME`` in NS (``addressType`` IPv4/IPv6; FQDN slices are
  skipped) whose ``conditions.ready`` is not false (unset means ready, as the EndpointSlice API
  says; with ``publishNotReadyAddresses: true`` every endpoint), the first slice (by name)
  winning for an address listed twice with the same ports (a slice update in flight). Each
  endpoint's ``ports`` maps the Service port's name to the slice port of the same name (its
  resolved target port: this is how named ``targetPort``\\ s map), and when the endpoint's
  ``targetRef`` is a Pod that is known, its ``labels`` are the Pod's labels and
  ``serviceAccount`` its ``spec.serviceAccountName`` (``default`` when unset) -- what
  DestinationRule subsets, ``sourceLabels`` and SAN checks use.
  WorkloadEntries of NS whose labels match the Service's ``selector`` are added too, as
  Istio's Kubernetes registry does for VM workloads.
* A Service with no ready endpoint keeps its host with an empty cluster (requests get 503 UH)
  through ``workloadSelector: {labels: SELECTOR}`` (which, as shown above, selects no
  WorkloadEntry either); a selector-less Service without endpoints, a Service without TCP
  ports and an ExternalName Service without ports give no document.
* ``type: ExternalName`` Services become ``location: MESH_EXTERNAL``, ``resolution: DNS`` with
  one endpoint, the ``externalName``.

Documents are ordered by ``creationTimestamp`` then namespace and name (Istio's "oldest first"
tie-breaker for conflicting resources).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLUSTER_DOMAIN",
    "ISTIO_KINDS",
    "Source",
    "documents_of",
    "istio_document",
    "port_protocol",
    "service_document",
]

CLUSTER_DOMAIN = "cluster.local"
ISTIO_KINDS: dict[str, str] = {
    "VirtualService": "networking.istio.io/v1",
    "DestinationRule": "networking.istio.io/v1",
    "ServiceEntry": "networking.istio.io/v1",
    "WorkloadEntry": "networking.istio.io/v1",
    "PeerAuthentication": "security.istio.io/v1",
    "AuthorizationPolicy": "security.istio.io/v1",
}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

# Istio's protocol.Parse (case-insensitive): the names a port name prefix or appProtocol may use
_PROTOCOLS = {
    "tcp": "TCP",
    "grpc": "GRPC",
    "grpc-web": "GRPC-WEB",
    "http": "HTTP",
    "http_proxy": "HTTP_PROXY",
    "http2": "HTTP2",
    "https": "HTTPS",
    "tls": "TLS",
    "mongo": "MONGO",
    "redis": "REDIS",
    "mysql": "MYSQL",
}
_APP_PROTOCOLS = {
    "kubernetes.io/h2c": "HTTP2",
    "k8s.io/h2c": "HTTP2",
    "kubernetes.io/ws": "HTTP",
    "kubernetes.io/wss": "HTTP",
    "k8s.io/ws": "HTTP",
    "k8s.io/wss": "HTTP",
}


@dataclass(frozen=True, slots=True)
class Source:
    """One document and where it came from (``k8s://Kind/NS/NAME``: the ``FILE`` of problem
    lines). ``derived``: generated from a Kubernetes object rather than an Istio one."""

    name: str
    document: dict[str, Any]
    derived: bool = False


Objects = Mapping[str, Mapping[str, dict[str, Any]]]  # kind -> "ns/name" -> object


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _str_map(v: Any) -> dict[str, str]:
    return {str(k): str(x) for k, x in _dict(v).items()}


def istio_document(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The document of an Istio object as a file would hold it (see the module docstring)."""
    m = _meta(obj)
    meta: dict[str, Any] = {"name": m.get("name"), "namespace": m.get("namespace") or "default"}
    labels = _dict(m.get("labels"))
    if labels:
        meta["labels"] = labels
    annotations = {k: v for k, v in _dict(m.get("annotations")).items() if k != LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    doc: dict[str, Any] = {
        "apiVersion": obj.get("apiVersion") or ISTIO_KINDS[kind],
        "kind": kind,
        "metadata": meta,
    }
    if "spec" in obj:
        doc["spec"] = obj["spec"]
    return doc


def port_protocol(name: str, app_protocol: str | None) -> str | None:
    """Istio's protocol selection for a Kubernetes Service port (None: auto-detect)."""
    if app_protocol:
        got = _APP_PROTOCOLS.get(app_protocol.lower())
        if got is not None:
            return got
        name = app_protocol
    low = name.lower()
    if low.startswith("grpc-web"):
        return "GRPC-WEB"
    return _PROTOCOLS.get(low.split("-", 1)[0])


def _port_name(port: Mapping[str, Any]) -> str:
    name = port.get("name")
    return name if isinstance(name, str) and name else f"port-{port.get('port')}"


def _selected(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _slice_endpoints(
    ns: str,
    slices: Iterable[Mapping[str, Any]],
    names: Mapping[str, str],
    pods: Mapping[str, Mapping[str, Any]],
    not_ready: bool = False,
) -> list[dict[str, Any]]:
    """The ready endpoints of ``slices``; ``names``: slice port name -> ServiceEntry port name."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, tuple[tuple[str, int], ...]]] = set()
    for sl in slices:
        if sl.get("addressType") not in ("IPv4", "IPv6"):
            continue
        ports: dict[str, int] = {}
        for p in _list(sl.get("ports")):
            p = _dict(p)
            se_name = names.get(str(p.get("name") or ""))
            number = p.get("port")
            if (
                se_name is not None
                and isinstance(number, int)
                and (p.get("protocol") or "TCP") == "TCP"
            ):
                ports[se_name] = number
        for ep in _list(sl.get("endpoints")):
            ep = _dict(ep)
            if _dict(ep.get("conditions")).get("ready") is False and not not_ready:
                continue
            ref = _dict(ep.get("targetRef"))
            pod: Mapping[str, Any] | None = None
            if ref.get("kind") == "Pod":
                pod = pods.get(f"{ref.get('namespace') or ns}/{ref.get('name')}")
            for addr in _list(ep.get("addresses")):
                if not isinstance(addr, str) or (addr, tuple(ports.items())) in seen:
                    continue
                seen.add((addr, tuple(ports.items())))
                entry: dict[str, Any] = {"address": addr}
                if ports:
                    entry["ports"] = dict(ports)
                if pod is not None:
                    labels = _str_map(_meta(pod).get("labels"))
                    if labels:
                        entry["labels"] = labels
                    spec = _dict(pod.get("spec"))
                    entry["serviceAccount"] = spec.get("serviceAccountName") or "default"
                out.append(entry)
    return out


def service_document(
    svc: Mapping[str, Any],
    slices: Iterable[Mapping[str, Any]],
    pods: Mapping[str, Mapping[str, Any]],
    workload_entries: Iterable[Mapping[str, Any]] = (),
    domain: str = CLUSTER_DOMAIN,
) -> dict[str, Any] | None:
    """The ServiceEntry document for Service ``svc`` (see the module docstring), or None."""
    m = _meta(svc)
    name, ns = m.get("name"), m.get("namespace") or "default"
    spec = _dict(svc.get("spec"))
    ports: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # the Service port's own name ("" if unnamed) -> SE port name
    for p in _list(spec.get("ports")):
        p = _dict(p)
        if (p.get("protocol") or "TCP") != "TCP" or not isinstance(p.get("port"), int):
            continue
        se_name = _port_name(p)
        names[str(p.get("name") or "")] = se_name
        port: dict[str, Any] = {"number": p["port"], "name": se_name}
        proto = port_protocol(str(p.get("name") or ""), p.get("appProtocol"))
        if proto is not None:
            port["protocol"] = proto
        target = p.get("targetPort")
        if isinstance(target, int) and target != p["port"]:
            port["targetPort"] = target
        ports.append(port)
    if not ports:
        return None
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    labels = _str_map(m.get("labels"))
    if labels:
        meta["labels"] = labels
    se: dict[str, Any] = {"hosts": [f"{name}.{ns}.svc.{domain}"]}
    doc = {"apiVersion": ISTIO_KINDS["ServiceEntry"], "kind": "ServiceEntry", "metadata": meta}
    if spec.get("type") == "ExternalName":
        external = spec.get("externalName")
        if not isinstance(external, str) or not external:
            return None
        se.update(
            ports=ports,
            location="MESH_EXTERNAL",
            resolution="DNS",
            endpoints=[{"address": external.rstrip(".")}],
        )
        doc["spec"] = se
        return doc
    ips = [a for a in _list(spec.get("clusterIPs")) if isinstance(a, str)]
    if not ips and isinstance(spec.get("clusterIP"), str):
        ips = [spec["clusterIP"]]
    addresses = [a for a in ips if a and a != "None"]
    if addresses:
        se["addresses"] = addresses
    se.update(ports=ports, location="MESH_INTERNAL", resolution="STATIC")
    selector = _str_map(spec.get("selector"))
    endpoints = _slice_endpoints(
        ns, slices, names, pods, spec.get("publishNotReadyAddresses") is True
    )
    if selector:
        for we in workload_entries:
            we_spec = _dict(we.get("spec"))
            if _selected(_str_map(we_spec.get("labels")), selector) and we_spec.get("address"):
                entry = {
                    k: we_spec[k]
                    for k in (
                        "address",
                        "ports",
                        "labels",
                        "serviceAccount",
                        "weight",
                        "network",
                        "locality",
                    )
                    if k in we_spec
                }
                endpoints.append(entry)
    if endpoints:
        se["endpoints"] = endpoints
    elif selector:
        se["workloadSelector"] = {"labels": selector}
    else:
        return None
    doc["spec"] = se
    return doc


def _order(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    m = _meta(obj)
    return (
        str(m.get("creationTimestamp") or ""),
        str(m.get("namespace") or ""),
        str(m.get("name")),
    )


def documents_of(objects: Objects, domain: str = CLUSTER_DOMAIN) -> list[Source]:
    """Every document the watched ``objects`` give, in load order (see the module docstring)."""
    items: list[tuple[tuple[str, str, str], str, Source]] = []
    for kind in ISTIO_KINDS:
        for obj in objects.get(kind, {}).values():
            m = _meta(obj)
            src = f"k8s://{kind}/{m.get('namespace') or 'default'}/{m.get('name')}"
            items.append((_order(obj), kind, Source(src, istio_document(kind, obj))))
    slices_by: dict[str, list[dict[str, Any]]] = {}
    for sl in objects.get("EndpointSlice", {}).values():
        m = _meta(sl)
        owner = _dict(m.get("labels")).get(SERVICE_NAME_LABEL)
        if owner:
            slices_by.setdefault(f"{m.get('namespace') or 'default'}/{owner}", []).append(sl)
    for key in slices_by:  # a stable slice order: the first slice wins a duplicated address
        slices_by[key].sort(key=lambda s: str(_meta(s).get("name")))
    wes_by_ns: dict[str, list[dict[str, Any]]] = {}
    for we in objects.get("WorkloadEntry", {}).values():
        wes_by_ns.setdefault(str(_meta(we).get("namespace") or "default"), []).append(we)
    for wes in wes_by_ns.values():
        wes.sort(key=_order)
    pods = objects.get("Pod", {})
    for svc in objects.get("Service", {}).values():
        m = _meta(svc)
        ns = str(m.get("namespace") or "default")
        key = f"{ns}/{m.get('name')}"
        doc = service_document(svc, slices_by.get(key, ()), pods, wes_by_ns.get(ns, ()), domain)
        if doc is not None:
            items.append((_order(svc), "~Service", Source(f"k8s://Service/{key}", doc, True)))
    items.sort(key=lambda t: (t[0], t[1]))
    return [s for _, _, s in items]
