"""``meshproxy wait`` as a real process against a real local HTTP server that answers 503 and
turns ready (200) after a delay: exit 0 once ready, exit 1 with the last answer at the timeout,
exit 2 on bad flags; and against a real ``meshproxy run --health``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiohttp import web

from tests.integration.proxyproc import (
    REPO,
    kill_process,
    meshproxy_argv,
    run_cli,
    start_listening,
)


class TurnsReady:
    """``GET /healthz/ready``: 503 until ``ready_after`` seconds after start, then 200."""

    def __init__(self, ready_after: float) -> None:
        self.ready_after = ready_after
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._t0 = 0.0

    async def _ready(self, request: web.Request) -> web.Response:
        self.hits += 1
        if time.monotonic() - self._t0 >= self.ready_after:
            return web.Response(text="ok")
        return web.Response(status=503, text="not yet")

    async def start(self) -> TurnsReady:
        app = web.Application()
        app.router.add_get("/healthz/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._t0 = time.monotonic()
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def wait_cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str, float]:
    """Run ``meshproxy wait ARGS`` to completion without blocking the loop (the server under
    test runs on it); returns (exit code, stdout, stderr, seconds taken)."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *meshproxy_argv("wait", *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - t0


async def test_wait_returns_once_the_server_turns_ready() -> None:
    server = await TurnsReady(ready_after=1.0).start()
    try:
        url = f"http://127.0.0.1:{server.port}/healthz/ready"
        code, out, err, took = await wait_cli("--url", url, "--period", "100ms", "--timeout", "20s")
        assert code == 0, err
        assert "ready" in out and url in out
        assert 0.9 <= took < 15
        assert server.hits >= 3  # it polled through the 503s
        assert "Traceback" not in err
    finally:
        await server.close()


async def test_wait_times_out_with_exit_1_and_the_last_answer() -> None:
    server = await TurnsReady(ready_after=3600).start()
    try:
        url = f"http://127.0.0.1:{server.port}/healthz/ready"
        code, _, err, took = await wait_cli("--url", url, "--period", "0.1", "--timeout", "1s")
        assert code == 1
        assert url in err and "not ready after 1s" in err and "HTTP 503" in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert 1.0 <= took < 10
        assert server.hits >= 3
    finally:
        await server.close()


async def test_wait_on_a_closed_port_times_out_naming_the_error() -> None:
    server = await TurnsReady(ready_after=0).start()
    port = server.port
    await server.close()  # nothing listens there now
    code, _, err, _ = await wait_cli(
        "--url", f"http://127.0.0.1:{port}/healthz/ready", "--timeout", "500ms"
    )
    assert code == 1 and "refused" in err.lower()


def test_bad_flags_exit_2() -> None:
    for args in (
        ["--timeout", "soon"],
        ["--period", "0"],
        ["--request-timeout", "-1s"],
        ["--no-such-flag"],
        ["--url", "https://127.0.0.1:15021/healthz/ready"],
        ["--url", "127.0.0.1:15021"],
    ):
        r = run_cli("wait", *args, timeout=20)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith(("meshproxy", "usage")), r.stderr
    r = run_cli("wait", "--help")
    assert r.returncode == 0 and "--timeout" in r.stdout and "15021/healthz/ready" in r.stdout


async def test_wait_against_a_real_sidecar_health_port(tmp_path: Path) -> None:
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    argv = ["run", "--config", str(cfg), "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    proc, fields = await start_listening(
        [*argv, "--health", "127.0.0.1:0"], tmp_path / "mp.log", "meshproxy --health"
    )
    try:
        url = f"http://{fields['health']}/healthz/ready"
        code, out, err, _ = await wait_cli("--url", url, "--timeout", "20s")
        assert "ready" in out
        assert code == 0, err
    finally:
        await kill_process(proc)
