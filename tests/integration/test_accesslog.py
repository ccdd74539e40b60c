"""``meshproxy run --access-log ...`` as a real process: lines in a file (one process and
``--workers 2``), on stdout after the ``listening`` line, and exit 2 for a path that cannot be
opened."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.proxyproc import REPO, MeshProxy, Upstream, meshproxy_argv


def tiny_yaml(port: int) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: ratings}}
        spec:
          hosts: [ratings.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 9080, name: http, protocol: HTTP}}]
          endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: ratings}}
        spec:
          hosts: [ratings]
          http:
          - match: [{{uri: {{prefix: /api}}}}]
            route: [{{destination: {{host: ratings}}}}]
        """
    )


async def _two_requests(p: MeshProxy) -> None:
    async with aiohttp.ClientSession() as s:
        status, body = await p.get(s, "/api/x?y=1", host="ratings")
        assert status == 200, body
        status, _ = await p.get(s, "/other", host="ratings")
        assert status == 404


def _entries(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _check(entries: list[dict[str, Any]], up: Upstream) -> None:
    assert len(entries) == 2, entries
    by_code = {e["response_code"]: e for e in entries}
    ok, nr = by_code[200], by_code[404]
    assert ok["response_flags"] == "-"
    assert ok["method"] == "GET" and ok["path"] == "/api/x?y=1" and ok["authority"] == "ratings"
    assert ok["upstream_host"] == f"127.0.0.1:{up.port}"
    assert ok["upstream_cluster"]
    assert ok["attempts"] == 1 and ok["bytes_sent"] > 0
    assert ok["request_id"] == up.server.requests[0].header("x-request-id")
    assert nr["response_flags"] == "NR"
    assert nr["upstream_host"] is None and nr["upstream_cluster"] is None
    assert nr["attempts"] == 0 and nr["path"] == "/other"


async def test_access_log_file(tmp_path: Path) -> None:
    up = await Upstream("ratings").start()
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(tiny_yaml(up.port))
    log_file = tmp_path / "access.log"
    p = MeshProxy([cfg], extra=["--access-log", str(log_file)], log_path=tmp_path / "meshproxy.log")
    try:
        await p.start()
        await _two_requests(p)
        assert await p.stop() == 0, p.stderr()
        _check(_entries(log_file.read_text()), up)
    finally:
        await p.kill()
        await up.close()


async def test_access_log_file_with_workers(tmp_path: Path) -> None:
    up = await Upstream("ratings").start()
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(tiny_yaml(up.port))
    log_file = tmp_path / "access.log"
    p = MeshProxy(
        [cfg],
        extra=["--workers", "2", "--access-log", str(log_file)],
        log_path=tmp_path / "meshproxy.log",
    )
    try:
        await p.start()
        await _two_requests(p)
        assert await p.stop() == 0, p.stderr()
        _check(_entries(log_file.read_text()), up)
    finally:
        await p.kill()
        await up.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_access_log_stdout_after_listening_line(tmp_path: Path, workers: int) -> None:
    up = await Upstream("ratings").start()
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(tiny_yaml(up.port))
    p = MeshProxy(
        [cfg],
        extra=["--workers", str(workers), "--access-log", "-"],
        log_path=tmp_path / "meshproxy.log",
    )
    try:
        await p.start()  # reads the first stdout line: the listening line
        await _two_requests(p)
        p.signal(signal.SIGTERM)
        assert p.proc is not None and p.proc.stdout is not None
        rest = await asyncio.wait_for(p.proc.stdout.read(), 15)
        assert await p.wait() == 0, p.stderr()
        _check(_entries(rest.decode()), up)
    finally:
        await p.kill()
        await up.close()


def test_access_log_unopenable_path_is_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(tiny_yaml(9))
    bad = "/nonexistent/dir/x"
    for extra in ([], ["--workers", "2"]):
        proc = subprocess.run(
            meshproxy_argv(
                "run",
                "--config",
                str(cfg),
                "--outbound",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--access-log",
                bad,
                *extra,
            ),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"cannot open access log {bad}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""
