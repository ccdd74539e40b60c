"""``run --health ADDR`` and ``--metrics ADDR`` through the public CLI, as real processes: each
serves its one path on its own listener (``/healthz/ready``, ``/stats/prometheus``) and
nothing of the admin API; both are on the ``listening`` line; with ``--workers 2`` the
supervisor serves them from the merged view; a port that cannot be bound exits 2."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from tests.integration.proxyproc import (
    Upstream,
    free_port,
    kill_process,
    request_samples,
    reviews_yaml,
    run_cli,
    start_listening,
    wait_until,
)

BASE = ["--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
STATUS = ["--health", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]


async def call(method: str, url: str, **kw: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=kw or None) as r:
        return r.status, await r.text()


async def requests_through(outbound: str, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for i in range(n):  # a new connection each time: with --workers, both serve some
            async with s.get(
                f"http://{outbound}/r{i}", headers={"Host": "reviews", "Connection": "close"}
            ) as r:
                assert r.status == 200


def source_requests(text: str) -> float:
    return sum(x.value for x in request_samples(text) if x.labels["reporter"] == "source")


@asynccontextmanager
async def reviews_proxy(
    tmp_path: Path, *extra: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, str]]]:
    """``meshproxy run`` with --health and --metrics in front of two real upstreams; yields
    the process and its listening line's fields; stopped by its PID."""
    v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(reviews_yaml(v1.port, v2.port))
    argv = ["run", "--config", str(cfg), *BASE, *STATUS, *extra]
    proc: asyncio.subprocess.Process | None = None
    try:
        proc, fields = await start_listening(argv, tmp_path / "mp.log", "meshproxy")
        yield proc, fields
    finally:
        await kill_process(proc)
        await v1.close()
        await v2.close()


async def test_health_and_metrics_listeners(tmp_path: Path) -> None:
    async with reviews_proxy(tmp_path) as (proc, f):
        assert {"health", "metrics", "admin", "outbound"} <= set(f)
        assert len({f["health"], f["metrics"], f["admin"]}) == 3  # three listeners
        health, metrics = f"http://{f['health']}", f"http://{f['metrics']}"
        await wait_until(lambda: _status_is(f"{health}/healthz/ready", 200), timeout=10)
        await requests_through(f["outbound"], 3)
        status, text = await call("GET", f"{metrics}/stats/prometheus")
        assert status == 200 and source_requests(text) == 3
        _, admin_text = await call("GET", f"http://{f['admin']}/stats/prometheus")
        assert source_requests(admin_text) == 3  # the same figures as the admin's
        # nothing else of the admin API is reachable there
        for base, method, path in (
            (health, "POST", "/quitquitquit"),
            (health, "POST", "/drain"),
            (health, "GET", "/config_dump"),
            (metrics, "POST", "/quitquitquit"),
            (metrics, "GET", "/healthz/ready"),
            (metrics, "GET", "/clusters"),
        ):
            assert (await call(method, base + path))[0] == 404, (base, path)
        assert proc.returncode is None
        assert (await call("GET", f"{health}/healthz/ready"))[0] == 200  # /drain was refused
        # POST /drain on the admin port: /healthz/ready follows /ready
        assert (await call("POST", f"http://{f['admin']}/drain"))[0] == 200
        assert (await call("GET", f"{health}/healthz/ready"))[0] == 503
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def _status_is(url: str, want: int) -> bool:
    try:
        return (await call("GET", url))[0] == want
    except aiohttp.ClientError:
        return False


async def test_health_is_503_until_ready(tmp_path: Path) -> None:
    """With a control plane that never answers, the proxy never gets a config: /healthz/ready
    stays 503 and ``meshproxy wait`` gives up with exit 1."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    proc, f = await start_listening(
        ["run", "--control-plane", nowhere, "--node-id", "n1", *BASE, *STATUS],
        tmp_path / "mp.log",
        "meshproxy --control-plane",
    )
    try:
        url = f"http://{f['health']}/healthz/ready"
        assert (await call("GET", url))[0] == 503
        wait = await asyncio.to_thread(run_cli, "wait", "--url", url, "--timeout", "1s")
        assert wait.returncode == 1 and "HTTP 503" in wait.stderr
    finally:
        await kill_process(proc)


async def test_workers_supervisor_serves_health_and_merged_metrics(tmp_path: Path) -> None:
    async with reviews_proxy(tmp_path, "--workers", "2") as (proc, f):
        health, metrics = f"http://{f['health']}", f"http://{f['metrics']}"
        await wait_until(lambda: _status_is(f"{health}/healthz/ready", 200), timeout=15)
        await requests_through(f["outbound"], 8)
        status, text = await call("GET", f"{metrics}/stats/prometheus")
        assert status == 200 and source_requests(text) == 8  # summed over both workers
        _, workers = await call("GET", f"http://{f['admin']}/workers")
        assert [w["alive"] for w in json.loads(workers)["workers"]] == [True, True]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


def test_a_health_port_in_use_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag in ("--health", "--metrics"):
            r = run_cli("run", "--config", str(cfg), *BASE, flag, f"127.0.0.1:{port}", timeout=30)
            assert r.returncode == 2, r.stderr
            name = flag.removeprefix("--")
            assert f"cannot listen on {name} 127.0.0.1:{port}" in r.stderr
            assert "Traceback" not in r.stderr
    r = run_cli("run", "--config", str(cfg), "--health", "nowhere")
    assert r.returncode == 2 and "--health" in r.stderr
