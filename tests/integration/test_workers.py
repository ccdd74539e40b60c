"""``--workers 2``: a supervisor with two worker processes sharing the outbound port."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.integration.proxyproc import (
    MeshProxy,
    Upstream,
    kill_process,
    request_samples,
    reviews_yaml,
    start_listening,
    wait_until,
)

N_REQUESTS = 60


@pytest.fixture
async def upstreams():
    v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
    yield v1, v2
    await v1.close()
    await v2.close()


@pytest.fixture
async def proxy(tmp_path: Path, upstreams):
    v1, v2 = upstreams
    cfg = tmp_path / "reviews.yaml"
    cfg.write_text(reviews_yaml(v1.port, v2.port, 100, 0))
    p = MeshProxy([cfg], extra=["--workers", "2"], log_path=tmp_path / "meshproxy.log")
    await p.start()
    yield p
    await p.stop()


async def worker_rows(proxy: MeshProxy) -> list[dict]:
    status, body = await proxy.admin_get("/workers")
    assert status == 200
    return body["workers"]


async def test_two_workers_serve_and_stats_aggregate(proxy: MeshProxy) -> None:
    async def ready() -> bool:
        return (await proxy.admin_get("/ready"))[0] == 200

    await wait_until(ready, timeout=10)
    rows = await worker_rows(proxy)
    assert len(rows) == 2 and all(r["alive"] for r in rows)
    assert len({r["pid"] for r in rows}) == 2 and proxy.pid not in {r["pid"] for r in rows}

    # a fresh connection per request: the kernel spreads them across both workers
    for _ in range(N_REQUESTS):
        async with aiohttp.ClientSession() as s:
            status, body = await proxy.get(s)
            assert status == 200 and body["name"] == "v1"

    per_worker = []
    for r in rows:
        url = f"http://{r['admin']}/stats/prometheus"
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            per_worker.append(sum(x.value for x in request_samples(await resp.text())))
    assert sum(per_worker) == N_REQUESTS
    assert all(n > 0 for n in per_worker), f"a worker served nothing: {per_worker}"

    _, text = await proxy.admin_get("/stats/prometheus")
    total = sum(s.value for s in request_samples(text))
    assert total == N_REQUESTS
    _, clusters = await proxy.admin_get("/clusters")
    assert any(c["name"].endswith("|v1") for c in clusters["clusters"])
    _, dump = await proxy.admin_get("/config_dump")
    assert dump["version"] and len(dump["workers"]) == 2
    assert dump["virtual_hosts"]
    # filters work through the supervisor too (it forwards them to the worker it asks)
    _, small = await proxy.admin_get("/config_dump?resource=version")
    assert small["version"] == dump["version"] and "virtual_hosts" not in small


async def test_dead_worker_is_restarted(proxy: MeshProxy) -> None:
    rows = await worker_rows(proxy)
    victim = rows[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    async def restarted() -> bool:
        now = await worker_rows(proxy)
        return now[0]["pid"] != victim and now[0]["alive"] and now[0]["restarts"] == 1

    await wait_until(restarted, timeout=10)

    async def ready() -> bool:
        return (await proxy.admin_get("/ready"))[0] == 200

    await wait_until(ready, timeout=10)
    assert "restarting" in proxy.stderr()


async def test_sigterm_stops_supervisor_and_workers(proxy: MeshProxy) -> None:
    pids = [r["pid"] for r in await worker_rows(proxy)]
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait(15) == 0
    await asyncio.sleep(0.1)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_workers_share_the_inbound_listener(tmp_path: Path) -> None:
    """``--workers 2 --inbound ... --app ...``: the supervisor reserves the inbound port, every
    worker serves it (SO_REUSEPORT), and the destination-side metrics are summed."""
    app = await Upstream("app").start()
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    proc, fields = await start_listening(
        [
            "run", "--config", str(cfg), "--workers", "2",
            "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--inbound", "127.0.0.1:0", "--app", f"127.0.0.1:{app.port}",
            "--namespace", "shop", "--labels", "app=web",
        ],
        tmp_path / "meshproxy.log",
        "meshproxy --workers 2 --inbound",
    )  # fmt: skip
    try:
        inbound, admin = fields["inbound"], fields["admin"]
        assert inbound.rsplit(":", 1)[1] != "0"
        for _ in range(N_REQUESTS):  # a fresh connection per request: both workers serve
            async with aiohttp.ClientSession() as s, s.get(f"http://{inbound}/x") as resp:
                assert resp.status == 200
                assert (await resp.json())["name"] == "app"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{admin}/workers") as resp:
                rows = (await resp.json())["workers"]
            per_worker = []
            for r in rows:
                async with s.get(f"http://{r['admin']}/stats/prometheus") as resp:
                    samples = request_samples(await resp.text())
                per_worker.append(
                    sum(x.value for x in samples if x.labels["reporter"] == "destination")
                )
            async with s.get(f"http://{admin}/stats/prometheus") as resp:
                merged = request_samples(await resp.text())
        assert sum(per_worker) == N_REQUESTS
        assert all(n > 0 for n in per_worker), f"a worker served nothing: {per_worker}"
        dest = [x for x in merged if x.labels["reporter"] == "destination"]
        assert sum(x.value for x in dest) == N_REQUESTS
        assert {x.labels["connection_security_policy"] for x in dest} == {"none"}
        assert {x.labels["destination_workload_namespace"] for x in dest} == {"shop"}
    finally:
        await kill_process(proc)
        await app.close()
