"""The sidecar's shutdown order (Istio issue 7136) and ``--exit-with-app``, with real processes.

An application runs as its own process (a stdlib HTTP server) behind a ``meshproxy run
--inbound`` sidecar; on ``GET /call?via=OUTBOUND`` it opens a NEW connection to the sidecar's
outbound listener and calls the ``backend`` service (a second, real upstream). The tests send
SIGTERM to the sidecar and show that: the application's new outbound calls made during the
drain still succeed; new inbound connections are refused; an in-flight inbound request
finishes; the process exits 0 once no connection is open (after ``--min-drain-seconds``, well
before ``--drain-seconds``), and at ``--drain-seconds`` when a connection stays open. Also:
without ``--inbound`` SIGTERM still refuses new connections at once; ``/quitquitquit`` and
``--exit-with-app`` (a PID, a port) are a prompt full drain; bad ``--exit-with-app`` values exit
2. Bounds on times are generous: only the order of events is asserted tightly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.integration.proxyproc import (
    RawConn,
    Upstream,
    free_port,
    kill_process,
    run_cli,
    start_listening,
    wait_until,
)

PID_BEYOND_PID_MAX = 4_194_400  # Linux's pid_max is at most 2**22

APP = textwrap.dedent(
    """\
    import http.client, json, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlsplit(self.path)
            q = parse_qs(url.query)
            if url.path == "/slow":
                time.sleep(float(q["s"][0]))
                return self.answer(200, {"slow": "done"})
            if url.path == "/call":  # a new connection to the sidecar's outbound listener
                host, port = q["via"][0].rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
                try:
                    conn.request("GET", "/from-app", headers={"Host": "backend"})
                    resp = conn.getresponse()
                    body = resp.read().decode()
                    return self.answer(200, {"status": resp.status, "body": body})
                except OSError as e:
                    return self.answer(502, {"error": repr(e)})
                finally:
                    conn.close()
            return self.answer(200, {"app": "hello"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)


def backend_yaml(port: int) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: backend
        spec:
          hosts: [backend.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports:
          - number: 80
            name: http
            protocol: HTTP
          endpoints:
          - address: 127.0.0.1
            ports: {{http: {port}}}
        """
    )


@dataclass
class App:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


async def start_app() -> App:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", APP, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        return App(proc, int(line))
    except BaseException:
        await kill_process(proc)
        raise


@dataclass
class World:
    app: App
    backend: Upstream
    config: Path
    workdir: Path


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    backend = await Upstream("backend").start()
    app = await start_app()
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(backend_yaml(backend.port))
    try:
        yield World(app, backend, cfg, tmp_path)
    finally:
        await kill_process(app.proc)
        await backend.close()


@dataclass
class Sidecar:
    proc: asyncio.subprocess.Process
    fields: dict[str, str]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def sigterm(self) -> float:
        os.kill(self.proc.pid, signal.SIGTERM)
        return time.monotonic()

    async def exit_code(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


@pytest.fixture
async def sidecars() -> AsyncIterator[list[Sidecar]]:
    started: list[Sidecar] = []
    yield started
    for s in started:
        await kill_process(s.proc)
        assert "Traceback" not in s.stderr(), s.stderr()


async def start_sidecar(
    world: World, started: list[Sidecar], *extra: str, inbound: bool = True
) -> Sidecar:
    argv = ["run", "--config", str(world.config), "--outbound", "127.0.0.1:0"]
    argv += ["--admin", "127.0.0.1:0", "--health", "127.0.0.1:0"]
    if inbound:
        argv += ["--inbound", "127.0.0.1:0", "--app", f"127.0.0.1:{world.app.port}"]
    log = world.workdir / f"sidecar-{len(started)}.log"
    proc, fields = await start_listening([*argv, *extra], log, "sidecar")
    side = Sidecar(proc, fields, log)
    started.append(side)
    await wait_until(lambda: healthz(side, 200), timeout=10)
    return side


async def get(url: str, timeout: float = 10) -> tuple[int, str]:
    t = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=t) as s, s.get(url) as r:
        return r.status, await r.text()


async def healthz(side: Sidecar, want: int) -> bool:
    try:
        status, _ = await get(f"http://{side.fields['health']}/healthz/ready", 2)
    except aiohttp.ClientError:
        return False
    return status == want


async def app_calls_backend(world: World, side: Sidecar) -> dict[str, object]:
    """The application opens a new connection to the sidecar's outbound listener."""
    status, text = await get(
        f"http://127.0.0.1:{world.app.port}/call?via={side.fields['outbound']}"
    )
    assert status == 200, text
    return json.loads(text)


async def refused(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        _, w = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return True
    w.close()
    return False


# --------------------------------------------------------------------------- SIGTERM, --inbound


async def test_sigterm_keeps_outbound_serving_refuses_inbound_and_exits_at_zero(
    world: World, sidecars: list[Sidecar]
) -> None:
    side = await start_sidecar(world, sidecars, "--drain-seconds", "20", "--min-drain-seconds", "1")
    first = await app_calls_backend(world, side)
    assert first["status"] == 200 and '"backend"' in str(first["body"])
    inbound = side.fields["inbound"]
    in_flight = asyncio.create_task(get(f"http://{inbound}/slow?s=2"))
    await asyncio.sleep(0.4)  # the inbound request is at the app now
    hits_before = world.backend.hits
    t0 = side.sigterm()
    await wait_until(lambda: healthz(side, 503), timeout=2)
    status, _ = await get(f"http://{side.fields['admin']}/ready")
    assert status == 503
    # (b) new inbound connections are refused
    assert await refused(inbound)
    # (a) the application's new outbound calls during the drain succeed, for ~1 s
    calls = []
    for _ in range(6):
        calls.append(await app_calls_backend(world, side))
        await asyncio.sleep(0.2)
    assert [c["status"] for c in calls] == [200] * 6, calls
    assert world.backend.hits == hits_before + 6
    assert side.proc.returncode is None  # still running while the inbound request is in flight
    # (c) the in-flight inbound request finishes
    status, body = await asyncio.wait_for(in_flight, 10)
    assert status == 200 and json.loads(body) == {"slow": "done"}
    # (d) exit 0 once no connection is open: after the in-flight request, before 20 s
    assert await side.exit_code(15) == 0
    took = time.monotonic() - t0
    assert 1.5 <= took < 10, took
    log = side.stderr()
    assert "stopping as a sidecar" in log and "--drain-seconds" not in log.split("SIGTERM")[1]


async def test_an_idle_sidecar_still_serves_the_app_until_the_minimum_drain(
    world: World, sidecars: list[Sidecar]
) -> None:
    """Issue 7136's case: no connection at SIGTERM, then the app calls out while it stops."""
    side = await start_sidecar(world, sidecars, "--drain-seconds", "20", "--min-drain-seconds", "2")
    t0 = side.sigterm()
    await asyncio.sleep(0.5)
    call = await app_calls_backend(world, side)
    assert call["status"] == 200
    assert await side.exit_code(15) == 0
    assert 2.0 <= time.monotonic() - t0 < 10


async def test_a_connection_left_open_keeps_it_until_drain_seconds(
    world: World, sidecars: list[Sidecar]
) -> None:
    side = await start_sidecar(
        world, sidecars, "--drain-seconds", "3", "--min-drain-seconds", "0.5"
    )
    idle = await RawConn.open(side.fields["outbound"])  # the app's pooled keep-alive connection
    try:
        status, _ = await idle.request("/", host="backend")
        assert status == 200
        t0 = side.sigterm()
        await asyncio.sleep(1.5)
        assert side.proc.returncode is None, "exited while a connection was open"
        status, _ = await idle.request("/again", host="backend")  # still served
        assert status == 200
        assert await side.exit_code(15) == 0
        assert 2.8 <= time.monotonic() - t0 < 10
        assert await idle.closed_by_peer(2)
        assert "passed with 1 connection(s) open" in side.stderr()
    finally:
        idle.close()


async def test_without_inbound_sigterm_refuses_new_connections_at_once(
    world: World, sidecars: list[Sidecar]
) -> None:
    side = await start_sidecar(
        world, sidecars, "--drain-seconds", "20", "--min-drain-seconds", "20", inbound=False
    )
    busy = await RawConn.open(side.fields["outbound"])
    try:
        slow = asyncio.create_task(busy.request("/slow?s=1", host="backend"))
        await asyncio.sleep(0.3)
        t0 = side.sigterm()
        await wait_until(lambda: refused(side.fields["outbound"]), timeout=2)
        status, _ = await asyncio.wait_for(slow, 10)
        assert status == 200
        assert await side.exit_code(15) == 0
        assert time.monotonic() - t0 < 8  # no minimum drain without --inbound
    finally:
        busy.close()


async def test_a_second_signal_cuts_the_sidecar_drain_short(
    world: World, sidecars: list[Sidecar]
) -> None:
    side = await start_sidecar(
        world, sidecars, "--drain-seconds", "30", "--min-drain-seconds", "30"
    )
    side.sigterm()
    await wait_until(lambda: healthz(side, 503), timeout=3)
    await asyncio.sleep(0.5)
    assert side.proc.returncode is None  # waiting for its minimum drain
    t0 = side.sigterm()
    assert await side.exit_code(15) == 0
    assert time.monotonic() - t0 < 5
    assert "second signal" in side.stderr()


async def test_stop_order_flag_overrides_the_choice_by_inbound(
    world: World, sidecars: list[Sidecar]
) -> None:
    """A pod without ports has no inbound listener and still wants the sidecar order; and an
    inbound listener does not force it."""
    side = await start_sidecar(
        world, sidecars, "--stop-order", "sidecar", "--min-drain-seconds", "1.5", inbound=False
    )
    t0 = side.sigterm()
    await wait_until(lambda: healthz(side, 503), timeout=3)
    assert (await app_calls_backend(world, side))["status"] == 200
    assert await side.exit_code(15) == 0
    assert 1.5 <= time.monotonic() - t0 < 10
    side = await start_sidecar(
        world, sidecars, "--stop-order", "drain", "--min-drain-seconds", "20"
    )
    t0 = side.sigterm()
    await wait_until(lambda: refused(side.fields["outbound"]), timeout=3)
    assert await side.exit_code(15) == 0
    assert time.monotonic() - t0 < 8


async def test_quitquitquit_is_a_prompt_full_drain_for_a_sidecar(
    world: World, sidecars: list[Sidecar]
) -> None:
    side = await start_sidecar(
        world, sidecars, "--drain-seconds", "30", "--min-drain-seconds", "30"
    )
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://{side.fields['admin']}/quitquitquit") as r,
    ):
        assert r.status == 200
    assert await side.exit_code(15) == 0
    assert time.monotonic() - t0 < 8


# --------------------------------------------------------------------------- --exit-with-app


async def test_exit_with_app_pid(world: World, sidecars: list[Sidecar]) -> None:
    app = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        side = await start_sidecar(
            world, sidecars, "--exit-with-app", str(app.pid), "--min-drain-seconds", "30"
        )
        await asyncio.sleep(1.0)
        assert side.proc.returncode is None  # the app is alive: the sidecar stays
        os.kill(app.pid, signal.SIGKILL)  # not reaped by us yet: a zombie
        t0 = time.monotonic()
        assert await side.exit_code(15) == 0
        assert time.monotonic() - t0 < 8
        assert f"the application (pid {app.pid}) is gone" in side.stderr()
    finally:
        app.kill()
        app.wait()


async def test_exit_with_app_port(world: World, sidecars: list[Sidecar]) -> None:
    # the sidecar fronts and watches the app of the world (a real process with a real port)
    port = world.app.port
    side = await start_sidecar(
        world, sidecars, "--exit-with-app", f"port:{port}", "--min-drain-seconds", "30"
    )
    await wait_until(lambda: "accepts connections" in side.stderr(), timeout=10)
    await asyncio.sleep(0.5)
    assert side.proc.returncode is None
    await kill_process(world.app.proc)
    t0 = time.monotonic()
    assert await side.exit_code(15) == 0
    assert time.monotonic() - t0 < 8
    assert f"the application (port 127.0.0.1:{port}) is gone" in side.stderr()


async def test_exit_with_app_port_waits_for_the_app_to_listen_first(
    world: World, sidecars: list[Sidecar]
) -> None:
    port = free_port()  # nothing listens there (yet)
    side = await start_sidecar(
        world, sidecars, "--exit-with-app", f"127.0.0.1:{port}", inbound=False
    )
    await asyncio.sleep(2.0)
    assert side.proc.returncode is None, "the app has not started yet: the sidecar must wait"


def test_bad_exit_with_app_values_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    for value, words in (
        ("pid:x", "pid: expects a number"),
        ("port:0", "1..65535"),
        ("somewhere", "expected pid:N"),
        (str(PID_BEYOND_PID_MAX), f"no process with pid {PID_BEYOND_PID_MAX}"),
    ):
        r = run_cli("run", "--config", str(cfg), "--exit-with-app", value, timeout=30)
        assert r.returncode == 2, (value, r.stderr)
        last = r.stderr.strip().splitlines()[-1]  # after argparse's usage, one message line
        assert last.startswith("meshproxy") and words in last, r.stderr
        assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- --workers


async def test_workers_stop_in_the_sidecar_order(world: World, sidecars: list[Sidecar]) -> None:
    side = await start_sidecar(
        world, sidecars, "--workers", "2", "--drain-seconds", "20", "--min-drain-seconds", "1.5"
    )
    t0 = side.sigterm()  # the supervisor passes SIGTERM on to each worker
    await wait_until(lambda: healthz(side, 503), timeout=3)
    await wait_until(lambda: refused(side.fields["inbound"]), timeout=3)
    for _ in range(4):  # new connections, spread over both workers by the kernel
        assert (await app_calls_backend(world, side))["status"] == 200
        await asyncio.sleep(0.2)
    assert await side.exit_code(15) == 0
    assert 1.5 <= time.monotonic() - t0 < 10


async def test_workers_exit_with_app_is_a_prompt_full_drain(
    world: World, sidecars: list[Sidecar]
) -> None:
    side = await start_sidecar(
        world,
        sidecars,
        "--workers",
        "2",
        "--exit-with-app",
        f"port:{world.app.port}",
        "--drain-seconds",
        "30",
        "--min-drain-seconds",
        "30",
    )
    await wait_until(lambda: "accepts connections" in side.stderr(), timeout=10)
    await kill_process(world.app.proc)
    t0 = time.monotonic()
    assert await side.exit_code(15) == 0  # the workers got /quitquitquit, not a 30 s SIGTERM
    assert time.monotonic() - t0 < 8
