"""``meshproxy control --kubernetes`` end to end: fake API server, real control plane, real sidecar.

Theory of operation
-------------------
The test process serves the fake Kubernetes API (tests/support/kubeapi.py: HTTPS, bearer token,
list/watch with resourceVersions, bookmarks, 410) and writes a kubeconfig for it. A real
``python -m meshproxy control --kubernetes --kubeconfig F --listen 127.0.0.1:0`` subprocess
watches it, and a real ``python -m meshproxy run --control-plane URL --node-id ...`` sidecar
takes its config from that control plane. Two real upstreams play the pods of ``reviews`` v1
and v2 (both on 127.0.0.1, so each has its own EndpointSlice: slices group endpoints by port).
Objects are created, updated and deleted through the fake API only; what is checked is where
requests sent through the sidecar land, the control plane's ``/status`` and
``meshproxy status``. Every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.proxyproc import (
    REPO,
    Control,
    MeshProxy,
    Upstream,
    meshproxy_argv,
    ready,
    run_cli,
    start_listening,
    wait_until,
)
from tests.support.kubeapi import FakeKubeAPI

CONVERGE = 15.0


@dataclass
class KubeControl(Control):
    """``meshproxy control --kubernetes`` (``config_dir`` holds the kubeconfig's path)."""

    async def start(self) -> KubeControl:
        argv = ["control", "--kubernetes", "--kubeconfig", str(self.config_dir)]
        argv += ["--listen", self.listen, "--debounce", "0.05", *self.extra]
        self.proc, fields = await start_listening(argv, self.log_path, "meshproxy control")
        self.addr = fields["control"]
        return self


@dataclass
class World:
    api: FakeKubeAPI
    control: KubeControl
    proxy: MeshProxy
    v1: Upstream
    v2: Upstream


def service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "default", "labels": {"app": "reviews"}},
        "spec": {
            "selector": {"app": "reviews"},
            "clusterIP": "10.96.12.7",
            "clusterIPs": ["10.96.12.7"],
            "ports": [{"name": "http", "port": 9080, "targetPort": 9080, "protocol": "TCP"}],
        },
    }


def pod(version: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"reviews-{version}",
            "namespace": "default",
            "labels": {"app": "reviews", "version": version},
        },
        "spec": {"serviceAccountName": "bookinfo-reviews", "containers": [{"name": "reviews"}]},
    }


def endpoint_slice(version: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"reviews-{version}",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "reviews"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": ["127.0.0.1"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": f"reviews-{version}", "namespace": "default"},
            }
        ],
    }


def destination_rule() -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "host": "reviews",
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        },
    }


def virtual_service(w1: int, w2: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "reviews", "subset": "v1"}, "weight": w1},
                        {"destination": {"host": "reviews", "subset": "v2"}, "weight": w2},
                    ]
                }
            ],
        },
    }


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    api = FakeKubeAPI()
    kubeconfig = tmp_path / "kubeconfig"
    v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
    control = KubeControl(kubeconfig, tmp_path / "control.log")
    proxy = MeshProxy(
        config=[],
        extra=["--control-plane", "", "--node-id", "productpage-1"],
        log_path=tmp_path / "sidecar.log",
    )
    try:
        await api.start(str(kubeconfig))
        await control.start()
        proxy.extra = ["--control-plane", control.url, "--node-id", "productpage-1"]
        await proxy.start()
        await wait_until(lambda: ready(proxy), timeout=CONVERGE)
        yield World(api, control, proxy, v1, v2)
    finally:
        await proxy.kill()
        await control.kill()
        await api.close()
        await v1.close()
        await v2.close()


async def answers(w: World, n: int = 6) -> list[Any]:
    """``(status, upstream name or None)`` of ``n`` requests to ``reviews`` via the sidecar."""
    out: list[Any] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            code, body = await w.proxy.get(s, "/")
            out.append((code, body["name"] if code == 200 and isinstance(body, dict) else None))
    return out


async def lands_on(w: World, expected: set[Any]) -> bool:
    return set(await answers(w)) == expected


async def synced(w: World) -> bool:
    st = await w.control.status()
    ps = st["proxies"]
    return len(ps) == 1 and ps[0]["status"] == "SYNCED" and ps[0]["acked_version"] == st["version"]


async def test_routes_follow_the_kubernetes_api(world: World) -> None:
    w = world
    assert (await w.control.status())["errors"] == []
    # nothing yet: the sidecar knows no host "reviews"
    assert set(await answers(w, 2)) == {(404, None)}
    for version in ("v1", "v2"):
        w.api.create(pod(version))
    w.api.create(service())
    w.api.create(endpoint_slice("v1", w.v1.port))
    w.api.create(endpoint_slice("v2", w.v2.port))
    w.api.create(destination_rule())
    w.api.create(virtual_service(100, 0))
    await wait_until(lambda: lands_on(w, {(200, "v1")}), timeout=CONVERGE)
    await wait_until(lambda: synced(w), timeout=CONVERGE)
    v_first = (await w.control.status())["version"]

    # a weight update shifts the traffic
    w.api.update(virtual_service(0, 100))
    await wait_until(lambda: lands_on(w, {(200, "v2")}), timeout=CONVERGE)
    await wait_until(lambda: synced(w), timeout=CONVERGE)
    assert (await w.control.status())["version"] != v_first

    # the v2 pod goes unready: its slice endpoint leaves, subset v2 is empty -> 503
    unready = endpoint_slice("v2", w.v2.port)
    unready["endpoints"][0]["conditions"]["ready"] = False
    w.api.update(unready)
    await wait_until(lambda: lands_on(w, {(503, None)}), timeout=CONVERGE)

    # an invalid VirtualService is reported and left out, as istiod does: the rest of the
    # config is still pushed (the default route: v2 is unready, so all goes to v1)
    before = (await w.control.status())["version"]
    bad = virtual_service(0, 100)
    bad["spec"]["http"][0]["timeout"] = "soon"
    w.api.update(bad)

    async def reported() -> bool:
        return bool((await w.control.status())["errors"])

    await wait_until(reported, timeout=CONVERGE)
    await wait_until(lambda: lands_on(w, {(200, "v1")}), timeout=CONVERGE)
    await wait_until(lambda: synced(w), timeout=CONVERGE)
    st = await w.control.status()
    assert st["version"] != before
    assert st["errors"] == [
        "k8s://VirtualService/default/reviews: VirtualService/reviews: spec.http[0].timeout: "
        "invalid duration 'soon' (expected e.g. '10s', '500ms', '1h2m')"
    ]
    out = await asyncio.to_thread(run_cli, "status", "--control-plane", w.control.url)
    assert out.returncode == 0, out.stderr
    assert "productpage-1" in out.stdout and "SYNCED" in out.stdout
    assert "1 config problem(s), not pushed:" in out.stdout
    assert "k8s://VirtualService/default/reviews" in out.stdout
    # an unrelated change (v2 ready again) still reaches the sidecar
    w.api.update(endpoint_slice("v2", w.v2.port))

    async def both() -> bool:
        got = set(await answers(w, 12))
        return got == {(200, "v1"), (200, "v2")}

    await wait_until(both, timeout=CONVERGE)
    assert len((await w.control.status())["errors"]) == 1

    # fixed and shifted back; then the API server "restarts" (streams closed, history
    # compacted, a change made in the gap): the 410 relist still delivers the change
    w.api.update(virtual_service(100, 0))

    async def fixed() -> bool:  # (errors first: 6 requests may all land on v1 by chance)
        return (await w.control.status())["errors"] == [] and await synced(w)

    await wait_until(fixed, timeout=CONVERGE)
    assert await lands_on(w, {(200, "v1")})
    lists = w.api.request_count("virtualservices", watch=False)
    w.api.close_watches()
    w.api.update(virtual_service(0, 100))
    w.api.compact()
    await wait_until(lambda: lands_on(w, {(200, "v2")}), timeout=CONVERGE)
    assert w.api.request_count("virtualservices", watch=False) == lists + 1  # one relist
    assert await w.control.metric('meshproxy_control_k8s_gone_total{kind="VirtualService"}') == 1

    # deleting the VirtualService: the default route spreads over both endpoints
    w.api.delete("VirtualService", "default", "reviews")
    await wait_until(both, timeout=CONVERGE)
    # deleting the Service: the host is gone, the sidecar answers 404
    w.api.delete("Service", "default", "reviews")
    await wait_until(lambda: lands_on(w, {(404, None)}), timeout=CONVERGE)
    await wait_until(lambda: synced(w), timeout=CONVERGE)
    st = await w.control.status()
    assert st["errors"] == []
    assert st["proxies"][0]["node_id"] == "productpage-1"


async def test_bad_flags_and_kubeconfig_exit_2(tmp_path: Path) -> None:
    out = await asyncio.to_thread(run_cli, "control", "--kubernetes", "--config", str(tmp_path))
    assert out.returncode == 2 and "not allowed with" in out.stderr
    out = await asyncio.to_thread(run_cli, "control", "--config", str(tmp_path), "--namespace", "x")
    assert out.returncode == 2 and "--namespace needs --kubernetes" in out.stderr
    missing = tmp_path / "nope"
    out = await asyncio.to_thread(run_cli, "control", "--kubernetes", "--kubeconfig", str(missing))
    assert out.returncode == 2 and f"--kubeconfig {missing}: no such file" in out.stderr
    broken = tmp_path / "kubeconfig"
    broken.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    out = await asyncio.to_thread(run_cli, "control", "--kubernetes", "--kubeconfig", str(broken))
    assert out.returncode == 2
    assert "cannot load the Kubernetes client config" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("via", ["home", "env"])
async def test_a_missing_default_kubeconfig_is_named(tmp_path: Path, via: str) -> None:
    """Without --kubeconfig, outside a cluster: the file looked for is named (the loader alone
    says "Expected key current-context")."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}  # fmt: skip
    env["HOME"] = str(tmp_path)
    if via == "env":
        env["KUBECONFIG"] = str(tmp_path / "gone.yaml")
        want = f"$KUBECONFIG {tmp_path / 'gone.yaml'}: no such file"
    else:
        want = f"~/.kube/config ({tmp_path / '.kube' / 'config'}): no such file"
    out = await asyncio.to_thread(
        subprocess.run,
        meshproxy_argv("control", "--kubernetes", "--listen", "127.0.0.1:0"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert out.returncode == 2, out.stderr
    assert want in out.stderr and "KUBERNETES_SERVICE_HOST is not set" in out.stderr
    assert "current-context" not in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
