"""The control plane with real proxies, end to end through the CLI.

Theory of operation
-------------------
Each test runs ``python -m meshproxy control --config DIR --listen 127.0.0.1:0`` and two
``python -m meshproxy run --control-plane URL --node-id ...`` sidecars (real processes, real
sockets on 127.0.0.1, OS-chosen ports), two real upstreams (``reviews`` v1 and v2), and looks
only at the public surface: where requests land, ``/ready``, ``/config_dump`` ``version``, the
control plane's ``/status`` and ``/metrics``, and ``meshproxy status``. Every process is
stopped by its PID.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.integration.proxyproc import (
    Control,
    MeshProxy,
    Upstream,
    free_port,
    ready,
    reviews_yaml,
    run_cli,
    wait_until,
    write_config,
)

CONVERGE = 10.0  # generous bound for a push to reach every proxy (measured: well under 1 s)
RECONNECT = 25.0  # backoff cap 15 s plus slack


@dataclass
class World:
    control: Control
    proxies: list[MeshProxy]
    v1: Upstream
    v2: Upstream
    mesh: Path  # the config file the tests edit

    def write(self, text: str) -> None:
        write_config(self.mesh, text)

    def reviews(self, w1: int, w2: int) -> str:
        return reviews_yaml(self.v1.port, self.v2.port, w1, w2)


async def start_proxy(tmp: Path, url: str, node: str, *extra: str) -> MeshProxy:
    p = MeshProxy(
        config=[],
        extra=["--control-plane", url, "--node-id", node, *extra],
        log_path=tmp / f"{node}.log",
    )
    return await p.start()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
    cfg = tmp_path / "mesh"
    cfg.mkdir()
    mesh = cfg / "reviews.yaml"
    write_config(mesh, reviews_yaml(v1.port, v2.port, 100, 0))
    control = Control(cfg, tmp_path / "control.log")
    proxies: list[MeshProxy] = []
    try:
        await control.start()
        for node in ("sidecar-a", "sidecar-b"):
            proxies.append(await start_proxy(tmp_path, control.url, node))
        for p in proxies:
            await wait_until(lambda p=p: ready(p), timeout=CONVERGE)
        yield World(control, proxies, v1, v2, mesh)
    finally:
        for p in proxies:
            await p.kill()
        await control.kill()
        await v1.close()
        await v2.close()


async def names(p: MeshProxy, n: int = 6) -> set[str]:
    """The upstreams ``n`` requests through ``p`` reached (raises on a non-200)."""
    got: set[str] = set()
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            code, body = await p.get(s, "/")
            assert code == 200, body
            got.add(body["name"])
    return got


async def all_synced(c: Control, n: int, version: str | None = None) -> bool:
    st = await c.status()
    v = version or st["version"]
    ps = st["proxies"]
    return len(ps) == n and all(p["status"] == "SYNCED" and p["acked_version"] == v for p in ps)


async def dump_version(p: MeshProxy) -> str:
    _, dump = await p.admin_get("/config_dump")
    return dump["version"]


# --------------------------------------------------------------------------- tests


async def test_push_and_traffic_shift_on_every_proxy(world: World) -> None:
    c = world.control
    st = await c.status()
    v0 = st["version"]
    assert st["errors"] == []
    assert [p["node_id"] for p in st["proxies"]] == ["sidecar-a", "sidecar-b"]
    for entry in st["proxies"]:
        assert entry["acked_version"] == v0 and entry["nacked"] is None
        assert entry["status"] == "SYNCED"
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", entry["connected_since"])
    for p in world.proxies:
        assert await names(p) == {"v1"}
        assert await dump_version(p) == v0  # the proxy runs exactly the version it acked

    world.write(world.reviews(0, 100))
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def shifted() -> bool:
        for p in world.proxies:
            if await names(p, 2) != {"v2"}:
                return False
        return True

    await wait_until(shifted, timeout=CONVERGE)
    took = loop.time() - t0
    await wait_until(lambda: all_synced(c, 2), timeout=CONVERGE)
    st = await c.status()
    v1 = st["version"]
    assert v1 != v0
    for p in world.proxies:
        assert await dump_version(p) == v1
    assert await c.metric("meshproxy_control_pushes_total") >= 4  # 2 proxies x 2 versions
    assert await c.metric("meshproxy_control_acks_total") >= 4
    assert await c.metric("meshproxy_control_connected_proxies") == 2
    print(f"traffic shifted on both proxies {took * 1000:.0f} ms after the file was written")

    # writing the same content again changes nothing and pushes nothing
    pushes = await c.metric("meshproxy_control_pushes_total")
    world.write(world.reviews(0, 100) + "\n# a comment only\n")
    await asyncio.sleep(1.0)
    assert (await c.status())["version"] == v1
    assert await c.metric("meshproxy_control_pushes_total") == pushes


async def test_invalid_edit_is_reported_and_not_pushed(world: World) -> None:
    c = world.control
    v0 = (await c.status())["version"]
    bad = world.reviews(0, 100).replace("weight: 100", "weight: 100\n      wieght: 3", 1)
    world.write(bad)

    async def reported() -> bool:
        return bool((await c.status())["errors"])

    await wait_until(reported, timeout=CONVERGE)
    st = await c.status()
    assert st["version"] == v0
    line = st["errors"][0]
    assert str(world.mesh) in line and "VirtualService/reviews" in line and "wieght" in line
    assert await c.metric("meshproxy_control_validation_errors_total") >= 1
    assert await c.metric("meshproxy_control_config_errors") >= 1
    for p in world.proxies:  # the invalid edit (which would send traffic to v2) is not live
        assert await names(p) == {"v1"}
        assert await dump_version(p) == v0
    assert all(e["status"] == "SYNCED" for e in st["proxies"])

    world.write(world.reviews(0, 100))  # fixed: now it goes out

    async def fixed() -> bool:
        st = await c.status()
        return st["errors"] == [] and st["version"] != v0

    await wait_until(fixed, timeout=CONVERGE)
    await wait_until(lambda: all_synced(c, 2), timeout=CONVERGE)
    for p in world.proxies:
        assert await names(p) == {"v2"}


NACKED_DR = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews-tls
spec:
  host: reviews
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: /nonexistent/meshproxy-test/root.pem
"""


async def test_a_proxy_nack_is_visible_in_status(world: World, tmp_path: Path) -> None:
    """A DestinationRule that validates but names a CA file the proxies do not have: the
    proxies refuse it as Envoy refuses such a cluster, keep routing with their last config,
    and the control plane shows the NACK (in /status and in ``meshproxy status``)."""
    c = world.control
    v0 = (await c.status())["version"]
    world.write(world.reviews(100, 0) + NACKED_DR)

    async def nacked() -> bool:
        ps = (await c.status())["proxies"]
        return all(p["status"] == "NACKED" for p in ps)

    await wait_until(nacked, timeout=CONVERGE)
    st = await c.status()
    assert st["errors"] == [] and st["version"] != v0
    for entry in st["proxies"]:
        assert "/nonexistent/meshproxy-test/root.pem" in entry["nacked"]
        assert entry["acked_version"] == v0
        assert entry["expected_version"] == st["version"]
    for p in world.proxies:
        assert await dump_version(p) == v0
        assert await names(p) == {"v1"}
        _, dump = await p.admin_get("/config_dump")
        assert dump["control_plane"]["nacks"] == 1
    assert await c.metric("meshproxy_control_nacks_total") == 2

    out = run_cli("status", "--control-plane", c.url)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert ["NODE", "NAMESPACE", "STATUS", "VERSION", "EXPECTED", "AGE"] in rows
    for node in ("sidecar-a", "sidecar-b"):
        row = next(r for r in rows if r and r[0] == node)
        assert row[1:5] == ["default", "NACKED", v0, st["version"]]
    assert "NACK sidecar-a:" in out.stdout and "/nonexistent/meshproxy-test/root.pem" in out.stdout

    world.write(world.reviews(0, 100))  # withdrawn: both proxies take the next version
    await wait_until(lambda: all_synced(c, 2), timeout=CONVERGE)
    for p in world.proxies:
        assert await names(p) == {"v2"}
    assert all(e["nacked"] is None for e in (await c.status())["proxies"])


async def test_sigkill_control_plane_proxies_keep_routing_then_resync(world: World) -> None:
    c = world.control
    v0 = (await c.status())["version"]
    await c.kill()
    assert c.proc is not None and c.proc.returncode == -signal.SIGKILL
    for _ in range(3):  # the mesh keeps serving with its last config
        for p in world.proxies:
            assert await names(p) == {"v1"}
            assert await ready(p)
        await asyncio.sleep(0.3)

    # the config changes while the control plane is down; it comes back on the same port
    world.write(world.reviews(0, 100))
    await c.start()
    await wait_until(lambda: all_synced(c, 2), timeout=RECONNECT)
    st = await c.status()
    assert st["version"] != v0
    for p in world.proxies:
        assert await names(p) == {"v2"}
        _, dump = await p.admin_get("/config_dump")
        assert dump["control_plane"]["streams"] >= 2 and dump["control_plane"]["connected"]


async def test_restart_with_the_same_content_pushes_nothing(world: World) -> None:
    c = world.control
    v0 = (await c.status())["version"]
    await c.kill()
    await c.start()
    await wait_until(lambda: all_synced(c, 2, v0), timeout=RECONNECT)
    assert (await c.status())["version"] == v0  # same content, same version after a restart
    assert await c.metric("meshproxy_control_pushes_total") == 0
    for p in world.proxies:
        assert await names(p) == {"v1"}


async def test_ready_waits_for_the_first_config(tmp_path: Path) -> None:
    """A sidecar whose control plane is not up yet listens, answers 503 on /ready, and turns
    ready once the control plane appears and pushes."""
    v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
    cfg = tmp_path / "mesh"
    cfg.mkdir()
    write_config(cfg / "reviews.yaml", reviews_yaml(v1.port, v2.port, 100, 0))
    port = free_port()
    control = Control(cfg, tmp_path / "control.log", listen=f"127.0.0.1:{port}")
    proxy = None
    try:
        proxy = await start_proxy(tmp_path, f"http://127.0.0.1:{port}", "early")
        code, _ = await proxy.admin_get("/ready")
        assert code == 503
        async with aiohttp.ClientSession() as s:
            code, _ = await proxy.get(s, "/")
        assert code == 404  # no config yet: no route
        await control.start()
        await wait_until(lambda: ready(proxy), timeout=RECONNECT)
        assert await names(proxy) == {"v1"}
        assert await control.stop() == 0
        assert await proxy.stop() == 0
    finally:
        if proxy is not None:
            await proxy.kill()
        await control.kill()
        await v1.close()
        await v2.close()


def test_control_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vs.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: x}\nspec: {hosts: [a], htp: []}\n"
    )
    out = run_cli("control", "--config", str(bad), "--listen", "127.0.0.1:0")
    assert out.returncode == 2
    assert "VirtualService/x: spec.htp: unknown field" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("control", "--config", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no such file or directory" in out.stderr
    for argv, msg in (
        (["run", "--control-plane", "http://127.0.0.1:1"], "--node-id"),
        (["run", "--node-id", "x", "--config", str(bad)], "--node-id goes with --control-plane"),
        (["run", "--control-plane", "ftp://x:1", "--node-id", "n"], "unsupported scheme"),
        (["run"], "one of the arguments --config --control-plane is required"),
        (["run", "--config", str(bad), "--control-plane", "http://h:1"], "not allowed with"),
        (["status", "--control-plane", f"http://127.0.0.1:{free_port()}"], "cannot reach"),
    ):
        out = run_cli(*argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert msg in out.stderr, (argv, out.stderr)
        assert "Traceback" not in out.stderr


async def test_workers_each_subscribe_as_their_own_node(world: World, tmp_path: Path) -> None:
    p = await start_proxy(tmp_path, world.control.url, "multi", "--workers", "2")
    try:
        await wait_until(lambda: ready(p), timeout=CONVERGE)
        st = await world.control.status()
        nodes = {e["node_id"]: e for e in st["proxies"]}
        assert {"multi.w0", "multi.w1"} <= set(nodes)
        assert all(nodes[n]["status"] == "SYNCED" for n in ("multi.w0", "multi.w1"))
        assert await names(p) == {"v1"}
    finally:
        await p.stop()
