"""The Kubernetes config source against the fake API server (tests/support/kubeapi.py).

In process, over real HTTPS with a bearer token and a kubeconfig that kubernetes_asyncio
loads: the reflectors list and watch every kind, the debounced loop reloads a real
:class:`ControlPlane` (whose HTTP side is not needed here), and assertions read its config.
The pure parts (Service -> ServiceEntry, diff, line splitting) are tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.exposition import generate_latest

from control.istio.translate import translate
from control.kube import KubeSource, KubeStore, slim_pod
from control.kube_registry import documents_of, port_protocol, service_document
from control.kube_watch import (
    Backoff,
    KubeClient,
    KubeError,
    LineSplitter,
    ReflectorSettings,
    diff,
)
from control.server import ControlPlane, ControlSettings
from meshproxy.config.model import ProxyIdentity
from tests.support.kubeapi import FakeKubeAPI

# --------------------------------------------------------------------------- objects


def vs(name: str, host: str, weights: tuple[int, int] | None = None, ns: str = "default") -> Any:
    if weights is None:
        route: list[dict[str, Any]] = [{"destination": {"host": host}}]
    else:
        route = [
            {"destination": {"host": host, "subset": "v1"}, "weight": weights[0]},
            {"destination": {"host": host, "subset": "v2"}, "weight": weights[1]},
        ]
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"hosts": [host], "http": [{"route": route}]},
    }


def dr(name: str, host: str, ns: str = "default") -> Any:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "host": host,
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        },
    }


def service(name: str, ns: str = "default", port: int = 9080, target: Any = 8080) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"app": name},
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}],
        },
    }


def pod(
    name: str, ip: str, labels: dict[str, str], ns: str = "default", sa: str = "bookinfo"
) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "x"}]},
        "status": {"podIP": ip},
    }


def endpoint_slice(
    name: str, svc: str, eps: list[tuple[str, str, bool]], port: int = 8080, ns: str = "default"
) -> Any:
    """``eps``: (ip, pod name, ready)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": p, "namespace": ns},
            }
            for ip, p, ready in eps
        ],
    }


# --------------------------------------------------------------------------- pure parts


def test_port_protocol_follows_istio_selection() -> None:
    assert port_protocol("http", None) == "HTTP"
    assert port_protocol("http-web", None) == "HTTP"
    assert port_protocol("HTTP2-x", None) == "HTTP2"
    assert port_protocol("grpc-web-x", None) == "GRPC-WEB"
    assert port_protocol("tcp-db", None) == "TCP"
    assert port_protocol("web", None) is None  # auto-detect
    assert port_protocol("web", "kubernetes.io/h2c") == "HTTP2"
    assert port_protocol("tcp-x", "http") == "HTTP"  # appProtocol wins


def test_service_document_maps_ports_endpoints_and_pods() -> None:
    svc = service("reviews", target="http-port")
    svc["spec"]["ports"].append({"port": 53, "protocol": "UDP", "name": "dns"})
    sl = endpoint_slice(
        "reviews-a", "reviews", [("10.0.0.1", "r1", True), ("10.0.0.2", "r2", False)], port=8081
    )
    sl["endpoints"].append({"addresses": ["10.0.0.3"], "conditions": {}})  # unset = ready
    pods = {"default/r1": slim_pod(pod("r1", "10.0.0.1", {"app": "reviews", "version": "v1"}))}
    doc = service_document(svc, [sl], pods)
    assert doc == {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "hosts": ["reviews.default.svc.cluster.local"],
            "addresses": ["10.96.0.10"],
            "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "endpoints": [
                {
                    "address": "10.0.0.1",
                    "ports": {"http": 8081},
                    "labels": {"app": "reviews", "version": "v1"},
                    "serviceAccount": "bookinfo",
                },
                {"address": "10.0.0.3", "ports": {"http": 8081}},
            ],
        },
    }


def test_publish_not_ready_addresses_keeps_unready_endpoints() -> None:
    svc = service("db")
    sl = endpoint_slice("db-a", "db", [("10.0.0.1", "db-0", False)])
    doc = service_document(svc, [sl], {})
    assert doc is not None and "endpoints" not in doc["spec"]
    svc["spec"]["publishNotReadyAddresses"] = True
    doc = service_document(svc, [sl], {})
    assert doc is not None and [e["address"] for e in doc["spec"]["endpoints"]] == ["10.0.0.1"]


def test_service_selects_workload_entries_of_its_namespace() -> None:
    svc = service("legacy")
    we = {
        "kind": "WorkloadEntry",
        "metadata": {"name": "vm-1", "namespace": "default"},
        "spec": {"address": "10.9.0.1", "labels": {"app": "legacy", "zone": "a"},
                 "serviceAccount": "legacy-vm", "ports": {"http": 8000}},
    }  # fmt: skip
    other = copy.deepcopy(we)
    other["metadata"]["name"] = "vm-2"
    other["spec"]["labels"] = {"app": "else"}
    objects = {
        "Service": {"default/legacy": svc},
        "WorkloadEntry": {"default/vm-1": we, "default/vm-2": other},
    }
    se = next(s for s in documents_of(objects) if s.derived)
    assert se.document["spec"]["endpoints"] == [we["spec"]]
    store = KubeStore()
    store.objects = objects
    out = store.load()
    assert out.config is not None, out.problems
    snap = translate(out.config.resources, ProxyIdentity("default", {}))
    eps = snap.clusters["legacy.default.svc.cluster.local"].endpoints
    assert [(e.address, e.port, e.service_account) for e in eps] == [
        ("10.9.0.1", 8000, "legacy-vm")
    ]


def test_service_without_endpoints_keeps_its_host_and_unnamed_port() -> None:
    svc = service("ratings", target=8080)
    svc["spec"]["ports"][0].pop("name")
    doc = service_document(svc, [], {})
    assert doc is not None
    assert doc["spec"]["ports"] == [{"number": 9080, "name": "port-9080", "targetPort": 8080}]
    assert doc["spec"]["workloadSelector"] == {"labels": {"app": "ratings"}}
    svc["spec"].pop("selector")
    assert service_document(svc, [], {}) is None  # no selector, no endpoints: no document


def test_external_name_service() -> None:
    svc = {
        "metadata": {"name": "ext", "namespace": "web"},
        "spec": {"type": "ExternalName", "externalName": "api.example.com.", "ports": [
            {"name": "https", "port": 443}]},
    }  # fmt: skip
    doc = service_document(svc, [], {})
    assert doc is not None and doc["spec"] == {
        "hosts": ["ext.web.svc.cluster.local"],
        "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}],
        "location": "MESH_EXTERNAL",
        "resolution": "DNS",
        "endpoints": [{"address": "api.example.com"}],
    }


def test_istio_documents_drop_server_fields_so_versions_are_content_derived() -> None:
    a = vs("r", "reviews")
    a["metadata"].update(resourceVersion="5", uid="u", managedFields=[{}], annotations={
        "kubectl.kubernetes.io/last-applied-configuration": "{}"})  # fmt: skip
    a["status"] = {"x": 1}
    b = copy.deepcopy(a)
    b["metadata"].update(resourceVersion="9", uid="v")
    docs_a = documents_of({"VirtualService": {"default/r": a}})
    docs_b = documents_of({"VirtualService": {"default/r": b}})
    assert docs_a == docs_b
    assert docs_a[0].name == "k8s://VirtualService/default/r"
    assert docs_a[0].document == {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": a["spec"],
    }


def test_diff_reports_adds_updates_deletes() -> None:
    old = {"a": {"metadata": {"resourceVersion": "1"}}, "b": {"metadata": {"resourceVersion": "2"}}}
    new = {"b": {"metadata": {"resourceVersion": "3"}}, "c": {"metadata": {"resourceVersion": "4"}}}
    assert [(t, k) for t, k, _ in diff(old, new)] == [
        ("DELETED", "a"),
        ("MODIFIED", "b"),
        ("ADDED", "c"),
    ]
    assert diff(new, new) == []


def test_line_splitter_across_chunks_and_bounded() -> None:
    s = LineSplitter(limit=64)
    assert list(s.feed(b'{"a":')) == []
    assert list(s.feed(b'1}\n{"b":2}\n{"c"')) == [b'{"a":1}', b'{"b":2}']
    assert s.tail() == b'{"c"'
    with pytest.raises(KubeError):
        list(s.feed(b"x" * 100))


def test_backoff_doubles_with_jitter_and_resets() -> None:
    b = Backoff(0.2, 1.0, rand=lambda: 1.0)
    assert [round(b.next(), 3) for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert Backoff(0.2, 1.0, rand=lambda: 0.0).next() == pytest.approx(0.1)


def test_store_leaves_an_invalid_istio_object_out_and_keeps_the_rest() -> None:
    bad = vs("reviews", "reviews")
    bad["spec"]["http"][0]["timeout"] = "forever"
    good = vs("ratings", "ratings")
    store = KubeStore()
    store.objects = {"VirtualService": {"default/ratings": good}}
    alone = store.load()
    assert alone.config is not None
    store.objects = {"VirtualService": {"default/reviews": bad, "default/ratings": good}}
    out = store.load()
    assert out.problems == (
        "k8s://VirtualService/default/reviews: VirtualService/reviews: "
        "spec.http[0].timeout: invalid duration 'forever' (expected e.g. '10s', '500ms', '1h2m')",
    )
    assert out.config is not None
    assert [r.name for r in out.config.resources.all()] == ["ratings"]
    # the same content gives the same version: that of the config without the bad object
    assert out.config.version == alone.config.version
    assert store.parsed == 1
    again = store.load()
    assert store.parsed == 0  # an unchanged document is not validated again
    assert again.config is not None and again.config.version == out.config.version


def test_store_drops_an_object_failing_a_cross_resource_check() -> None:
    """A route to a subset its DestinationRule does not define: that VirtualService goes, the
    DestinationRule and the other routes stay."""
    wrong = vs("reviews", "reviews", (50, 50))
    wrong["spec"]["http"][0]["route"][1]["destination"]["subset"] = "v3"
    rule = dr("reviews", "reviews")
    fine = vs("ratings", "ratings")
    store = KubeStore()
    store.objects = {
        "VirtualService": {"default/reviews": wrong, "default/ratings": fine},
        "DestinationRule": {"default/reviews": rule},
    }
    out = store.load()
    assert out.config is not None
    assert sorted(f"{r.kind}/{r.name}" for r in out.config.resources.all()) == [
        "DestinationRule/reviews",
        "VirtualService/ratings",
    ]
    (problem,) = out.problems
    assert problem.startswith(
        "k8s://VirtualService/default/reviews: VirtualService/reviews: spec.http[0].route[1]"
    )
    assert "subset 'v3' is not defined by DestinationRule/reviews" in problem


# --------------------------------------------------------------------------- against the API


class Env:
    def __init__(self, api: FakeKubeAPI, source: KubeSource, cp: ControlPlane) -> None:
        self.api, self.source, self.cp = api, source, cp
        self.events: list[tuple[str, str, str]] = []
        self.versions: list[str] = []
        source.on_event = lambda kind, typ, key, obj: self.events.append((kind, typ, key))

    def docs(self) -> dict[str, dict[str, Any]]:
        """The live config's documents by ``Kind/ns/name``."""
        assert self.cp.config is not None
        cfg = self.cp.config
        return {f"{r.kind}/{r.namespace}/{r.name}": cfg.document(r) for r in cfg.resources.all()}

    def reflector(self, kind: str) -> Any:
        return next(r for r in self.source.reflectors if r.kind.kind == kind)

    async def until(self, pred: Any, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                if pred():
                    return
            except (AssertionError, KeyError, StopIteration):
                pass
            if loop.time() > deadline:
                raise AssertionError(f"not reached in {timeout} s: {self.cp!r} {self.source!r}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, api: FakeKubeAPI | None = None, wait: bool = True, **settings: float
) -> AsyncIterator[Env]:
    """The fake API server, a :class:`KubeSource` on it and a :class:`ControlPlane` it
    reloads, all synced (unless not ``wait``); ``settings``: :class:`ReflectorSettings`
    fields."""
    api = api or FakeKubeAPI(history=50)
    kubeconfig = str(tmp_path / "kubeconfig")
    await api.start(kubeconfig)
    client = await KubeClient.create(kubeconfig, None)
    settings = {"backoff_initial": 0.05, "backoff_max": 0.2, **settings}
    source = KubeSource(client, debounce=0.05, settings=ReflectorSettings(**settings))
    cp = ControlPlane([], ControlSettings(debounce=0.05), store=source.store)
    e = Env(api, source, cp)
    original = cp.reload

    async def reload() -> bool:
        changed = await original()
        if changed and cp.config is not None:
            e.versions.append(cp.config.version)
        return changed

    cp.reload = reload  # type: ignore[method-assign]
    source.start()
    task = asyncio.create_task(source.run(cp))
    try:
        if wait:
            await asyncio.wait_for(source.synced(), 10)
        yield e
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()
        await cp.close()
        await api.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with running(tmp_path) as e:
        yield e


async def test_lists_then_watches_every_kind_with_bookmarks(env: Env) -> None:
    await env.until(lambda: env.api.watch_count() == 9)
    for _path, q in env.api.requests:
        if q.get("watch") == "1":
            assert q["allowWatchBookmarks"] == "true"
            assert q["resourceVersion"] == "100"  # the (empty) lists' resourceVersion
            assert 300 <= int(q["timeoutSeconds"]) < 600
    assert {p for p, q in env.api.requests if "watch" not in q} == {
        "/apis/networking.istio.io/v1/virtualservices",
        "/apis/networking.istio.io/v1/destinationrules",
        "/apis/networking.istio.io/v1/serviceentries",
        "/apis/networking.istio.io/v1/workloadentries",
        "/apis/security.istio.io/v1/peerauthentications",
        "/apis/security.istio.io/v1/authorizationpolicies",
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/pods",
    }
    await env.until(lambda: env.cp.config is not None)  # an empty mesh is a valid config
    # an object elsewhere moves the global resourceVersion; a bookmark tells the VS watch
    env.api.create(service("other"))
    env.api.bookmark()
    vs_ref = env.reflector("VirtualService")
    await env.until(lambda: vs_ref.resource_version == str(env.api.rv) and vs_ref.bookmarks == 1)
    # reconnecting watches resume from the bookmark's resourceVersion, with no relist
    lists = env.api.request_count("virtualservices", watch=False)
    env.api.close_watches()
    await env.until(lambda: env.api.request_count("virtualservices", watch=True) == 2)
    last = [q for p, q in env.api.requests if p.endswith("virtualservices") and "watch" in q][-1]
    assert last["resourceVersion"] == str(env.api.rv)
    assert env.api.request_count("virtualservices", watch=False) == lists
    assert vs_ref.gone == 0


async def test_creates_updates_deletes_of_each_istio_kind(env: Env) -> None:
    await env.until(lambda: env.cp.config is not None)
    objects = [
        vs("reviews", "reviews"),
        dr("reviews", "reviews"),
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {
                "hosts": ["api.example.com"],
                "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                "resolution": "STATIC",
                "workloadSelector": {"labels": {"app": "vm"}},
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {"name": "vm1", "namespace": "default"},
            "spec": {"address": "10.1.0.1", "labels": {"app": "vm"}},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "default"},
            "spec": {"mtls": {"mode": "PERMISSIVE"}},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow", "namespace": "default"},
            "spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]},
        },
    ]
    n = len(env.versions)
    for o in objects:
        env.api.create(o)
    names = {f"{o['kind']}/default/{o['metadata']['name']}" for o in objects}
    await env.until(lambda: names <= set(env.docs()))
    assert len(env.versions) == n + 1  # one burst, one new version
    for o in objects:
        key = f"{o['kind']}/default/{o['metadata']['name']}"
        assert env.docs()[key]["spec"] == o["spec"]
    # updates of each kind
    updated = copy.deepcopy(objects)
    updated[0]["spec"]["http"][0]["timeout"] = "3s"
    updated[1]["spec"]["trafficPolicy"] = {"connectionPool": {"tcp": {"maxConnections": 7}}}
    updated[2]["spec"]["hosts"] = ["api2.example.com"]
    updated[3]["spec"]["address"] = "10.1.0.2"
    updated[4]["spec"]["mtls"]["mode"] = "STRICT"
    updated[5]["spec"]["action"] = "DENY"
    for o in updated:
        env.api.update(o)
    await env.until(
        lambda: all(
            env.docs()[f"{o['kind']}/default/{o['metadata']['name']}"]["spec"] == o["spec"]
            for o in updated
        )
    )
    # a write that changes nothing of the document (labels aside: same spec, same metadata)
    # gives the same version
    before = env.cp.config.version if env.cp.config else None
    env.api.update(updated[0])
    await asyncio.sleep(0.4)
    assert env.cp.config is not None and env.cp.config.version == before
    # deletes
    for o in objects:
        env.api.delete(o["kind"], "default", o["metadata"]["name"])
    await env.until(lambda: not (names & set(env.docs())))
    types = {(k, t) for k, t, _ in env.events}
    for o in objects:
        for t in ("ADDED", "MODIFIED", "DELETED"):
            assert (o["kind"], t) in types


async def test_service_endpointslice_pods_become_a_registry_entry(env: Env) -> None:
    env.api.create(service("reviews"))
    env.api.create(pod("reviews-v1", "10.0.0.1", {"app": "reviews", "version": "v1"}))
    env.api.create(pod("reviews-v2", "10.0.0.2", {"app": "reviews", "version": "v2"}, sa="rv2"))
    env.api.create(
        endpoint_slice(
            "reviews-abc",
            "reviews",
            [("10.0.0.1", "reviews-v1", True), ("10.0.0.2", "reviews-v2", True)],
        )
    )
    env.api.create(dr("reviews", "reviews"))
    env.api.create(vs("reviews", "reviews", (80, 20)))
    key = "ServiceEntry/default/reviews"
    await env.until(lambda: len(env.docs()[key]["spec"].get("endpoints", [])) == 2)
    assert env.cp.config is not None
    snap = translate(env.cp.config.resources, ProxyIdentity("default", {"app": "productpage"}))
    host = "reviews.default.svc.cluster.local"
    base = snap.clusters[host]
    assert base.port == 9080 and base.protocol == "HTTP"
    assert [(e.address, e.port, dict(e.labels), e.service_account) for e in base.endpoints] == [
        ("10.0.0.1", 8080, {"app": "reviews", "version": "v1"}, "bookinfo"),
        ("10.0.0.2", 8080, {"app": "reviews", "version": "v2"}, "rv2"),
    ]
    assert [e.address for e in snap.clusters[f"{host}|v1"].endpoints] == ["10.0.0.1"]
    assert [e.address for e in snap.clusters[f"{host}|v2"].endpoints] == ["10.0.0.2"]
    # a pod that stops being ready leaves the cluster; a relabelled pod changes subsets
    env.api.update(
        endpoint_slice(
            "reviews-abc",
            "reviews",
            [("10.0.0.1", "reviews-v1", True), ("10.0.0.2", "reviews-v2", False)],
        )
    )
    await env.until(lambda: len(env.docs()[key]["spec"]["endpoints"]) == 1)
    env.api.update(pod("reviews-v1", "10.0.0.1", {"app": "reviews", "version": "v2"}))
    await env.until(lambda: env.docs()[key]["spec"]["endpoints"][0]["labels"]["version"] == "v2")
    snap = translate(env.cp.config.resources, ProxyIdentity("default", {}))
    assert [e.address for e in snap.clusters[f"{host}|v2"].endpoints] == ["10.0.0.1"]
    assert snap.clusters[f"{host}|v1"].endpoints == ()
    # a Pod's status-only update is no event and no reload
    seen = len(env.events)
    versions = len(env.versions)
    moved = pod("reviews-v2", "10.0.0.2", {"app": "reviews", "version": "v2"}, sa="rv2")
    moved["status"] = {"phase": "Running", "podIP": "10.0.0.2"}
    env.api.update(moved)
    await env.until(lambda: env.reflector("Pod").resource_version == str(env.api.rv))
    await asyncio.sleep(0.2)
    assert env.events[seen:] == [] and len(env.versions) == versions
    # the Service goes: so does its entry
    env.api.delete("Service", "default", "reviews")
    await env.until(lambda: key not in env.docs())


async def test_forced_410_relists_without_losing_an_event(env: Env) -> None:
    keep = env.api.create(vs("keep", "keep"))
    change = env.api.create(vs("change", "change"))
    env.api.create(vs("gone", "gone"))
    await env.until(lambda: {"VirtualService/default/" + n for n in ("keep", "change", "gone")}
                    <= set(env.docs()))  # fmt: skip
    ref = env.reflector("VirtualService")
    lists = ref.lists
    # the gap: streams closed, changes made, history compacted -- all before any reconnect
    env.api.close_watches()
    changed = copy.deepcopy(change)
    changed["spec"]["http"][0]["timeout"] = "9s"
    env.api.update(changed)
    env.api.delete("VirtualService", "default", "gone")
    env.api.create(vs("new", "new"))
    env.api.compact()
    await env.until(lambda: ref.gone >= 1 and ref.lists == lists + 1)
    await env.until(
        lambda: (
            "VirtualService/default/gone" not in env.docs()
            and "VirtualService/default/new" in env.docs()
            and env.docs()["VirtualService/default/change"]["spec"]["http"][0].get("timeout")
            == "9s"
        )
    )
    assert env.docs()["VirtualService/default/keep"]["spec"] == keep["spec"]
    relisted = env.events[-10:]
    assert ("VirtualService", "DELETED", "default/gone") in relisted
    assert ("VirtualService", "MODIFIED", "default/change") in relisted
    assert ("VirtualService", "ADDED", "default/new") in relisted
    assert ("VirtualService", "MODIFIED", "default/keep") not in relisted
    metrics = generate_latest(env.cp.metrics.registry).decode()
    assert 'meshproxy_control_k8s_gone_total{kind="VirtualService"} 1.0' in metrics
    assert 'meshproxy_control_k8s_lists_total{kind="VirtualService"} 2.0' in metrics
    assert 'meshproxy_control_k8s_events_total{event="deleted",kind="VirtualService"} 1.0' in (
        metrics
    )
    # and the watch goes on from the relist
    env.api.delete("VirtualService", "default", "keep")
    await env.until(lambda: "VirtualService/default/keep" not in env.docs())


async def test_410_as_an_http_status_also_relists(env: Env) -> None:
    env.api.create(vs("a", "a"))
    await env.until(lambda: "VirtualService/default/a" in env.docs())
    ref = env.reflector("VirtualService")
    env.api.gone_as_http = True
    env.api.close_watches()
    env.api.delete("VirtualService", "default", "a")
    env.api.compact()
    await env.until(lambda: "VirtualService/default/a" not in env.docs())
    assert ref.gone >= 1
    gone = [q for p, q in env.api.requests if p.endswith("virtualservices") and "watch" in q]
    assert len(gone) >= 2


async def test_history_overflow_while_disconnected_is_a_410(env: Env) -> None:
    # 60 changes > the fake's 50-event history: the reconnecting watch is too old
    env.api.close_watches()
    for i in range(60):
        env.api.create(service(f"s{i}"))
    await env.until(lambda: env.reflector("Service").gone >= 1)
    await env.until(lambda: len(env.reflector("Service").objects) == 60)


async def test_an_invalid_virtual_service_is_left_out_and_the_rest_is_pushed(
    tmp_path: Path,
) -> None:
    """istiod's behaviour: an invalid object present at start does not keep the control plane
    without a config; it is reported, the rest (here a Service's scale-up) is pushed, and
    fixing it pushes it and clears the error."""
    api = FakeKubeAPI()
    bad = vs("reviews", "reviews")
    bad["spec"]["http"][0]["match"] = [{"uri": {"regex": "("}}]
    api.create(bad)
    api.create(vs("ratings", "ratings"))
    api.create(service("ratings"))
    api.create(endpoint_slice("ratings-a", "ratings", [("10.0.0.1", "ratings-1", True)]))
    async with running(tmp_path, api) as env:
        host, port = await env.cp.start("127.0.0.1", 0)
        base = f"http://{host}:{port}"
        await env.until(lambda: env.cp.config is not None)
        assert "VirtualService/default/reviews" not in env.docs()
        assert "VirtualService/default/ratings" in env.docs()
        (problem,) = env.cp.errors
        assert problem.startswith(
            "k8s://VirtualService/default/reviews: VirtualService/reviews: "
            "spec.http[0].match[0].uri.regex: "
        )
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/ready") as r:
                assert r.status == 200
            async with s.get(base + "/status") as r:
                assert (await r.json())["errors"] == [problem]
        # an unrelated scale-up is pushed; the error stays, logged once
        key = "ServiceEntry/default/ratings"
        env.api.update(
            endpoint_slice(
                "ratings-a",
                "ratings",
                [("10.0.0.1", "ratings-1", True), ("10.0.0.2", "ratings-2", True)],
            )
        )
        await env.until(lambda: len(env.docs()[key]["spec"]["endpoints"]) == 2)
        assert env.cp.errors == (problem,)
        # fixed: pushed, no errors
        env.api.update(vs("reviews", "reviews2"))
        await env.until(lambda: "VirtualService/default/reviews" in env.docs())
        assert env.cp.errors == ()
        assert env.docs()["VirtualService/default/reviews"]["spec"]["hosts"] == ["reviews2"]


async def test_a_problem_is_logged_once_however_many_reloads(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    bad = vs("reviews", "reviews")
    bad["spec"]["http"][0]["timeout"] = "5x"
    env.api.create(bad)
    env.api.create(vs("ratings", "ratings", (50, 50)))  # subsets without a DestinationRule
    await env.until(lambda: bool(env.cp.errors) and "VirtualService/default/ratings" in env.docs())
    for i in range(3):
        env.api.create(service(f"s{i}"))
        await env.until(lambda i=i: f"ServiceEntry/default/s{i}" in env.docs())
    logged = [r for r in caplog.records if "k8s://VirtualService/default/reviews" in r.message]
    assert len(logged) == 1 and logged[0].levelname == "ERROR"
    warned = [r for r in caplog.records if "k8s://VirtualService/default/ratings" in r.message]
    assert len(warned) == 2 and {r.levelname for r in warned} == {"WARNING"}  # v1 and v2


async def test_namespaced_watch_sees_only_its_namespace(tmp_path: Path) -> None:
    api = FakeKubeAPI()
    kubeconfig = str(tmp_path / "kubeconfig")
    await api.start(kubeconfig)
    api.create(vs("a", "a", ns="team-a"))
    api.create(vs("b", "b", ns="team-b"))
    client = await KubeClient.create(kubeconfig, None)
    source = KubeSource(client, ["team-a"], debounce=0.02)
    source.start()
    try:
        await asyncio.wait_for(source.synced(), 10)
        assert set(source.snapshot()["VirtualService"]) == {"team-a/a"}
        assert any(p == "/apis/networking.istio.io/v1/namespaces/team-a/virtualservices"
                   for p, _ in api.requests)  # fmt: skip
    finally:
        await source.close()
        await api.close()


async def test_bad_token_is_retried_with_backoff(tmp_path: Path) -> None:
    api = FakeKubeAPI(token="right")
    kubeconfig = str(tmp_path / "kubeconfig")
    await api.start()
    api.token = "wrong"
    api.write_kubeconfig(kubeconfig)
    api.token = "right"
    client = await KubeClient.create(kubeconfig, None)
    source = KubeSource(client, settings=ReflectorSettings(backoff_initial=0.05, backoff_max=0.1))
    source.start()
    try:
        await asyncio.sleep(0.5)
        r = source.reflectors[0]
        assert not r.synced.is_set() and r.errors >= 2
        assert r.last_error is not None and "401" in r.last_error
    finally:
        await source.close()
        await api.close()


@pytest.mark.parametrize(
    "text",
    [
        "apiVersion: v1\nkind: Config\ncontexts: []\nclusters: []\nusers: []\n",
        "a: [\n::",  # not YAML
        "just a string",
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', certificate-authority: "
        "/nonexistent/ca.pem}}]\nusers: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    ],
)
async def test_unloadable_kubeconfig_is_a_one_line_error(tmp_path: Path, text: str) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text(text)
    with pytest.raises(KubeError) as e:
        await KubeClient.create(str(bad), None)
    assert str(e.value).startswith(f"cannot load the Kubernetes client config ({bad}): ")
    assert "\n" not in str(e.value)


async def test_kubeconfig_context_is_chosen(tmp_path: Path) -> None:
    api = FakeKubeAPI(tls=False)
    path = tmp_path / "kubeconfig"
    await api.start()
    try:
        cfg = api.kubeconfig("staging")
        cfg["current-context"] = "nowhere"  # only --context makes it loadable
        path.write_text(yaml.safe_dump(cfg))
        client = await KubeClient.create(str(path), "staging")
        try:
            assert client.host == api.url
        finally:
            await client.close()
        with pytest.raises(KubeError, match="cannot load"):
            await KubeClient.create(str(path), None)
    finally:
        await api.close()


async def test_watch_timeouts_reconnect_from_the_last_resource_version(tmp_path: Path) -> None:
    # timeoutSeconds=1: the server ends every watch after a second
    async with running(tmp_path, min_watch_timeout=1.0) as env:
        ref = env.reflector("VirtualService")
        env.api.create(vs("a", "a"))
        await env.until(lambda: env.api.request_count("virtualservices", watch=True) >= 3)
        assert {q["timeoutSeconds"] for p, q in env.api.requests if "watch" in q} == {"1"}
        env.api.create(vs("b", "b"))
        await env.until(lambda: {"VirtualService/default/a", "VirtualService/default/b"}
                        <= set(env.docs()))  # fmt: skip
        assert ref.lists == 1 and ref.gone == 0 and ref.errors == 0


async def test_a_stuck_watch_is_abandoned_after_its_read_timeout(tmp_path: Path) -> None:
    api = FakeKubeAPI()
    api.hang_watches = True  # streams that say nothing, past timeoutSeconds
    async with running(tmp_path, api, min_watch_timeout=1.0, read_margin=0.3) as env:
        ref = env.reflector("VirtualService")
        await env.until(lambda: ref.errors >= 1)
        assert ref.last_error is not None and "watch /apis/" in ref.last_error
        api.hang_watches = False
        env.api.create(vs("late", "late"))
        await env.until(lambda: "VirtualService/default/late" in env.docs(), timeout=15)
        assert ref.lists == 1 and ref.gone == 0  # resumed from its resourceVersion


async def test_an_uninstalled_crd_does_not_hold_back_the_config(tmp_path: Path) -> None:
    api = FakeKubeAPI()
    api.missing = {"AuthorizationPolicy"}
    api.create(vs("a", "a"))
    async with running(tmp_path, api) as env:
        await env.until(lambda: "VirtualService/default/a" in env.docs())
        api.missing = set()
        api.create(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny", "namespace": "default"},
                "spec": {"action": "DENY", "rules": [{}]},
            }
        )
        await env.until(lambda: "AuthorizationPolicy/default/deny" in env.docs())


async def test_forbidden_and_missing_collections_are_reported_while_they_last(
    tmp_path: Path,
) -> None:
    """A 403 on a first list (RBAC missing) holds the first config back and says why in
    /status errors, /ready and meshproxy status; a 404 (CRD not installed) is tolerated (the
    config comes without it) but reported too. Both clear once the API serves them."""
    from control.cli import fetch_status, format_status

    api = FakeKubeAPI()
    api.forbidden = {"Service"}
    api.missing = {"AuthorizationPolicy"}
    api.create(vs("a", "a"))
    async with running(tmp_path, api, wait=False) as env:
        host, port = await env.cp.start("127.0.0.1", 0)
        base = f"http://{host}:{port}"
        forbidden = (
            "k8s://Service: GET /api/v1/services: 403: services is forbidden: User "
            '"system:serviceaccount:istio-system:meshproxy" cannot list resource "services" in '
            'API group "" at the cluster scope (no config until it is listed; retrying)'
        )
        missing = (
            "k8s://AuthorizationPolicy: /apis/security.istio.io/v1/authorizationpolicies (nor at "
            "v1beta1) is not served by the API server (CRD not installed?): taken as empty, "
            "listed again with backoff"
        )
        await env.until(lambda: env.cp.status()["errors"] == [missing, forbidden])
        assert env.cp.config is None
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/ready") as r:
                assert r.status == 503
                assert (await r.text()) == f"no config\n{missing}\n{forbidden}\n"
            async with s.get(base + "/status") as r:
                assert (await r.json())["errors"] == [missing, forbidden]
        shown = format_status(await asyncio.to_thread(fetch_status, base))
        assert f"  {forbidden}" in shown.splitlines()
        # RBAC fixed: the config comes; the missing CRD is still said
        api.forbidden = set()
        await env.until(lambda: env.cp.config is not None)
        assert "VirtualService/default/a" in env.docs()
        await env.until(lambda: env.cp.status()["errors"] == [missing])
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/ready") as r:
                assert r.status == 200
        # the CRD installed: nothing to say any more
        api.missing = set()
        await env.until(lambda: env.cp.status()["errors"] == [])


async def test_a_watch_that_keeps_failing_is_reported(env: Env) -> None:
    await env.until(lambda: env.api.watch_count() == 9)
    env.api.forbidden = {"DestinationRule"}  # the RBAC rule removed while running
    env.api.close_watches()
    await env.until(lambda: any(e.startswith("k8s://DestinationRule: ") and "403" in e
                                for e in env.cp.status()["errors"]))  # fmt: skip
    env.api.forbidden = set()
    await env.until(lambda: env.cp.status()["errors"] == [])


async def test_istio_before_1_22_is_listed_and_watched_at_v1beta1(tmp_path: Path) -> None:
    """A kind served only at v1beta1 (Istio < 1.22): after the 404 at v1 the reflector uses
    v1beta1 for that kind only; a kind served at neither is not served (both tried)."""
    api = FakeKubeAPI()
    api.versions = {"VirtualService": "v1beta1", "PeerAuthentication": "v1beta1"}
    api.missing = {"AuthorizationPolicy"}
    api.create(vs("a", "a"))
    async with running(tmp_path, api) as env:
        key = "VirtualService/default/a"
        await env.until(lambda: key in env.docs())
        ref = env.reflector("VirtualService")
        assert ref.path == "/apis/networking.istio.io/v1beta1/virtualservices"
        assert env.docs()[key]["apiVersion"] == "networking.istio.io/v1beta1"
        assert env.reflector("PeerAuthentication").path == (
            "/apis/security.istio.io/v1beta1/peerauthentications"
        )
        assert env.reflector("DestinationRule").path == (
            "/apis/networking.istio.io/v1/destinationrules"
        )
        env.api.update(vs("a", "b"))
        await env.until(lambda: env.docs()[key]["spec"]["hosts"] == ["b"])
        watched = {p for p, q in env.api.requests if "watch" in q and "virtualservices" in p}
        assert watched == {"/apis/networking.istio.io/v1beta1/virtualservices"}
        tried = {p for p, _ in env.api.requests if p.endswith("/authorizationpolicies")}
        assert tried == {
            "/apis/security.istio.io/v1/authorizationpolicies",
            "/apis/security.istio.io/v1beta1/authorizationpolicies",
        }
        assert [e.split(":")[1] for e in env.cp.status()["errors"]] == ["//AuthorizationPolicy"]


async def test_a_cancel_arriving_with_a_change_stops_the_loop() -> None:
    """Python 3.11's asyncio.wait_for returned the result of an inner wait that completed in
    the same loop iteration as the cancellation, losing it: a SIGTERM during churn left
    ``meshproxy control --kubernetes`` running forever. The debounce wait must not swallow a
    cancel."""
    source = KubeSource(KubeClient(None), debounce=0.5, max_delay=10.0)
    cp = ControlPlane([], ControlSettings(), store=source.store)
    for r in source.reflectors:
        r.synced.set()
    task = asyncio.create_task(source.run(cp))
    while cp.config is None:  # the first (empty) config
        await asyncio.sleep(0.01)
    source._changed.set()  # a change: the loop is now in its debounce wait
    await asyncio.sleep(0.05)
    source._changed.set()  # another change, in the same iteration as the cancel
    task.cancel()
    try:
        done, _ = await asyncio.wait([task], timeout=2)
        assert done == {task} and task.cancelled()
    finally:
        task.cancel()  # (a lost cancel: end it anyway)
        await asyncio.gather(task, return_exceptions=True)


def test_version_does_not_depend_on_arrival_order() -> None:
    objs = [vs(f"v{i}", f"h{i}") for i in range(8)] + [dr(f"d{i}", f"h{i}") for i in range(8)]
    for i, o in enumerate(objs):
        o["metadata"]["creationTimestamp"] = f"2026-01-01T00:00:0{i % 3}Z"
    versions = set()
    for seed in range(5):
        shuffled = objs[:]
        random.Random(seed).shuffle(shuffled)
        by_kind: dict[str, dict[str, Any]] = {}
        for o in shuffled:
            by_kind.setdefault(o["kind"], {})[f"default/{o['metadata']['name']}"] = o
        store = KubeStore()
        store.objects = by_kind
        out = store.load()
        assert out.config is not None, out.problems
        versions.add(out.config.version)
    assert len(versions) == 1


async def test_periodic_bookmarks_move_the_resource_version(tmp_path: Path) -> None:
    async with running(tmp_path, FakeKubeAPI(bookmark_interval=0.1)) as env:
        ref = env.reflector("DestinationRule")
        env.api.create(vs("a", "a"))  # moves the global resourceVersion, not this collection
        await env.until(lambda: ref.bookmarks >= 2 and ref.resource_version == str(env.api.rv))
        assert ref.objects == {}


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_changes_restarts_and_compactions_lose_nothing(
    tmp_path: Path, seed: int
) -> None:
    """Creates, updates and deletes interleaved at random with closed streams, compactions
    (410) and bookmarks: afterwards the reflectors hold exactly what the API server holds."""
    rnd = random.Random(seed)
    async with running(tmp_path, FakeKubeAPI(history=20)) as env:
        live: dict[str, Any] = {}

        def change(step: int) -> None:
            name = f"v{rnd.randrange(12)}"
            if name in live and rnd.random() < 0.35:
                env.api.delete("VirtualService", "default", name)
                del live[name]
            else:
                obj = vs(name, f"h{step}")
                live[name] = (env.api.update if name in live else env.api.create)(obj)

        for step in range(300):
            op = rnd.random()
            if op < 0.05:  # an outage: streams cut, changes meanwhile, history compacted
                env.api.close_watches()
                for _ in range(rnd.randrange(1, 5)):
                    change(step)
                env.api.compact()
            elif op < 0.09:  # streams cut: the watches resume from their resourceVersion
                env.api.close_watches()
            elif op < 0.11:
                env.api.bookmark()
            else:
                change(step)
            if rnd.random() < 0.3:
                await asyncio.sleep(rnd.random() * 0.01)
        ref = env.reflector("VirtualService")

        def same() -> bool:
            want = {f"default/{n}": o["metadata"]["resourceVersion"] for n, o in live.items()}
            got = {k: o["metadata"]["resourceVersion"] for k, o in ref.objects.items()}
            return got == want

        await env.until(same)
        assert ref.gone >= 1 and ref.lists >= 2  # the run went through 410s and relists

        def pushed() -> bool:
            docs = {k: d["spec"] for k, d in env.docs().items() if k.startswith("VirtualS")}
            return docs == {f"VirtualService/default/{n}": o["spec"] for n, o in live.items()}

        await env.until(pushed)
