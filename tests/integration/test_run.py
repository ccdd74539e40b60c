"""``meshproxy run`` as a real process: routing, admin, metrics, hot reload, drain, signals.

Each test starts ``python -m meshproxy run`` on 127.0.0.1 port 0 with an Istio config in
tmp_path, reads the ``listening`` line, and talks to it and to real upstreams over loopback.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from tests.integration.proxyproc import (
    MeshProxy,
    RawConn,
    Upstream,
    free_port,
    many_services_yaml,
    request_samples,
    reviews_yaml,
    wait_until,
    write_config,
)

FQDN = "reviews.default.svc.cluster.local"


@pytest.fixture
async def upstreams():
    v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
    yield v1, v2
    await v1.close()
    await v2.close()


@pytest.fixture
def mesh_dir(tmp_path: Path, upstreams) -> Path:
    v1, v2 = upstreams
    d = tmp_path / "mesh"
    d.mkdir()
    (d / "reviews.yaml").write_text(reviews_yaml(v1.port, v2.port, 100, 0))
    return d


@pytest.fixture
async def proxy(tmp_path: Path, mesh_dir: Path):
    p = MeshProxy(
        [mesh_dir],
        extra=["--labels", "app=productpage,version=v1", "--drain-seconds", "5"],
        log_path=tmp_path / "meshproxy.log",
    )
    await p.start()
    yield p
    await p.stop()


async def test_routes_and_admin(proxy: MeshProxy) -> None:
    async with aiohttp.ClientSession() as s:
        assert (await proxy.admin_get("/ready"))[0] == 200
        for _ in range(5):
            status, body = await proxy.get(s)
            assert status == 200 and body["name"] == "v1"
        status, body = await proxy.get(s, headers={"end-user": "jason"})
        assert status == 200 and body["name"] == "v2"
        assert body["headers"].get("X-Request-Id") or body["headers"].get("x-request-id")
        status, _ = await proxy.get(s, host="nosuch.example.com")
        assert status == 404
        # absolute-form, as an http_proxy client sends it
        async with s.get("http://reviews/abs?q=1", proxy=f"http://{proxy.outbound}") as r:
            assert r.status == 200
            assert (await r.json())["path"] == "/abs?q=1"

    status, dump = await proxy.admin_get("/config_dump")
    assert status == 200 and dump["version"] and dump["last_error"] is None
    assert dump["listeners"][0]["address"] == proxy.outbound
    (vh,) = [v for v in dump["virtual_hosts"] if v["meta"]["kind"] == "VirtualService"]
    assert vh["meta"]["name"] == "reviews"
    assert "reviews" in vh["aliases"]
    jason = vh["routes"][0]
    assert jason["meta"]["kind"] == "VirtualService" and jason["meta"]["name"] == "reviews"
    assert jason["matches"][0]["headers"][0][0] == "end-user"
    assert [c["subset"] for c in jason["clusters"]] == ["v2"]
    split = vh["routes"][1]
    assert [(c["subset"], c["weight"]) for c in split["clusters"]] == [("v1", 100), ("v2", 0)]
    kinds = {c["name"]: (c["meta"] or {}).get("kind") for c in dump["clusters"]}
    assert kinds[f"{FQDN}|v1"] == "ServiceEntry"
    v1 = next(c for c in dump["clusters"] if c["name"] == f"{FQDN}|v1")
    assert v1["policy_meta"]["kind"] == "DestinationRule"
    assert [e["labels"]["version"] for e in v1["endpoints"]] == ["v1"]

    status, clusters = await proxy.admin_get("/clusters")
    names = {c["name"] for c in clusters["clusters"]}
    assert {f"{FQDN}|v1", f"{FQDN}|v2"} <= names
    for c in clusters["clusters"]:
        for e in c["endpoints"]:
            assert set(e) >= {"address", "healthy", "ejected", "ejections", "active_requests"}

    status, text = await proxy.admin_get("/stats/prometheus")
    assert status == 200
    samples = request_samples(text)
    ok = [s for s in samples if s.labels["response_code"] == "200"]
    assert sum(s.value for s in ok) == 7
    by_version = {s.labels["destination_version"]: s.value for s in ok}
    assert by_version == {"v1": 6, "v2": 1}
    for s in ok:
        assert s.labels["reporter"] == "source"
        assert s.labels["destination_service"] == FQDN
        assert s.labels["destination_service_name"] == "reviews"
        assert s.labels["source_app"] == "productpage"
        assert s.labels["response_flags"] == "-"
    (nr,) = [s for s in samples if s.labels["response_code"] == "404"]
    assert nr.labels["response_flags"] == "NR" and nr.value == 1
    assert "meshproxy_downstream_connections_active" in text
    assert 'meshproxy_config_version_info{version="' + dump["version"] + '"} 1' in text


async def test_hot_reload_shifts_traffic_without_errors(proxy: MeshProxy, upstreams) -> None:
    v1, v2 = upstreams
    cfg = Path(proxy.config[0]) / "reviews.yaml"
    _, before = await proxy.admin_get("/config_dump")
    results: list[tuple[float, int, str]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def client() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                status, body = await proxy.get(s)
                name = body["name"] if isinstance(body, dict) else ""
                results.append((loop.time(), status, name))

    task = asyncio.create_task(client())
    await asyncio.sleep(0.3)
    edited_at = loop.time()
    write_config(cfg, reviews_yaml(v1.port, v2.port, 0, 100))

    def shifted() -> bool:
        recent = [r for r in results if r[0] > edited_at][-5:]
        return len(recent) == 5 and all(r[2] == "v2" for r in recent)

    await wait_until(shifted, timeout=2.0)
    shifted_at = loop.time()
    await asyncio.sleep(0.3)
    stop.set()
    await task
    assert shifted_at - edited_at < 2.0
    failures = [r for r in results if r[1] != 200]
    assert failures == [], f"{len(failures)} failed request(s) during reload"
    assert Counter(r[2] for r in results if r[0] < edited_at) == Counter(
        {"v1": sum(1 for r in results if r[0] < edited_at)}
    )
    _, after = await proxy.admin_get("/config_dump")
    assert after["version"] != before["version"]
    _, text = await proxy.admin_get("/stats/prometheus")
    assert 'meshproxy_config_reloads_total{result="success"} 2' in text


async def test_invalid_edit_keeps_old_config(proxy: MeshProxy, upstreams) -> None:
    v1, v2 = upstreams
    cfg = Path(proxy.config[0]) / "reviews.yaml"
    _, before = await proxy.admin_get("/config_dump")
    bad = reviews_yaml(v1.port, v2.port, 0, 100).replace("weight: 100", "wieght: 100")
    write_config(cfg, bad)  # an unknown field is a problem, as in Istio's schema validation

    async def rejected() -> bool:
        _, dump = await proxy.admin_get("/config_dump")
        return dump["last_error"] is not None

    await wait_until(rejected, timeout=3.0)
    _, dump = await proxy.admin_get("/config_dump")
    assert dump["version"] == before["version"]
    assert "reviews.yaml" in dump["last_error"]
    assert "VirtualService/reviews" in dump["last_error"]
    assert "wieght" in dump["last_error"]
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, body = await proxy.get(s)
            assert status == 200 and body["name"] == "v1"
    assert "WARNING" in proxy.stderr() and "wieght" in proxy.stderr()
    _, text = await proxy.admin_get("/stats/prometheus")
    assert 'meshproxy_config_reloads_total{result="rejected"} 1' in text
    # fixing the file clears the error and applies it
    write_config(cfg, reviews_yaml(v1.port, v2.port, 0, 100))

    async def recovered() -> bool:
        _, dump = await proxy.admin_get("/config_dump")
        return dump["last_error"] is None and dump["version"] != before["version"]

    await wait_until(recovered, timeout=3.0)


async def test_sigterm_drains_in_flight_and_closes_idle(proxy: MeshProxy) -> None:
    idle = await RawConn.open(proxy.outbound)
    status, _ = await idle.request()
    assert status == 200
    busy = await RawConn.open(proxy.outbound)
    slow = asyncio.create_task(busy.request("/slow?s=1"))
    await asyncio.sleep(0.3)  # the slow request is in flight
    proxy.signal(signal.SIGTERM)
    assert await idle.closed_by_peer(0.5), "idle keep-alive connection was not closed at once"
    status, _ = await asyncio.wait_for(proxy.admin_get("/ready"), 2)
    assert status == 503
    status, body = await asyncio.wait_for(slow, 5)
    assert status == 200 and b'"v1"' in body
    assert await proxy.wait(10) == 0
    assert "Traceback" not in proxy.stderr()
    idle.close()
    busy.close()


async def test_drain_endpoint_refuses_new_connections(proxy: MeshProxy) -> None:
    assert await proxy.admin_post("/drain") == 200
    assert (await proxy.admin_get("/ready"))[0] == 503
    host, _, port = proxy.outbound.rpartition(":")
    with pytest.raises(OSError):
        _, w = await asyncio.open_connection(host, int(port))
        w.close()
    assert proxy.proc is not None and proxy.proc.returncode is None  # still running


async def test_quitquitquit_exits_zero(proxy: MeshProxy) -> None:
    assert await proxy.admin_post("/quitquitquit") == 200
    assert await proxy.wait(10) == 0


async def test_sigint_exits_zero(proxy: MeshProxy) -> None:
    proxy.signal(signal.SIGINT)
    assert await proxy.wait(10) == 0


async def test_ready_is_503_until_the_first_config_is_applied(tmp_path: Path, mesh_dir) -> None:
    (mesh_dir / "many.yaml").write_text(many_services_yaml(2000))
    admin = f"127.0.0.1:{free_port()}"
    p = MeshProxy([mesh_dir], admin=admin, log_path=tmp_path / "meshproxy.log")
    statuses: list[int] = []
    stop = asyncio.Event()

    async def poll() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                try:
                    async with s.get(f"http://{admin}/ready") as r:
                        statuses.append(r.status)
                except aiohttp.ClientConnectionError:
                    pass  # not listening yet
                await asyncio.sleep(0.02)

    poller = asyncio.create_task(poll())
    try:
        await p.start()
        await wait_until(lambda: statuses and statuses[-1] == 200, timeout=5)
    finally:
        stop.set()
        await poller
        await p.stop()
    assert 503 in statuses, "admin never answered 503 while the config was being built"
    first_ok = statuses.index(200)
    assert all(s == 503 for s in statuses[:first_ok])
    assert all(s == 200 for s in statuses[first_ok:])
