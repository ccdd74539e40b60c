"""meshproxy.lifecycle: the pure parts without sockets (durations, --exit-with-app values, the
wait loop on a fake clock, the drain window, the restricted admin servers' routing), then the
edges with real ones: the app watchers on a real process and a real port, and the data plane's
inbound-only drain."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import pytest
import trustme

from meshproxy.admin import Admin, AdminRequest
from meshproxy.cli import UsageError, build_parser, listening_line
from meshproxy.config.model import ProxyIdentity
from meshproxy.dataplane import DataPlane
from meshproxy.lifecycle import (
    AppProber,
    AppTarget,
    StatusListeners,
    _pid_ended,
    check_app_target,
    drain_window,
    parse_app_probers,
    parse_app_target,
    parse_duration,
    parse_http_url,
    poll_until_ready,
    sidecar_stop,
    watch_app,
)
from meshproxy.metrics import Metrics
from meshproxy.settings import Settings
from meshproxy.state import State

PID_BEYOND_PID_MAX = 4_194_400  # Linux's pid_max is at most 2**22 = 4194304


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("500ms", 0.5), ("1m30s", 90.0), ("0.2s", 0.2), ("2", 2.0), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10x", "1s garbage", "-1s", "1e3", "ms5", "1.2.3s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="duration"):
        parse_duration(text)


# --------------------------------------------------------------------------- --exit-with-app


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("1234", AppTarget(pid=1234)),
        ("pid:1234", AppTarget(pid=1234)),
        ("port:8080", AppTarget(addr=("127.0.0.1", 8080))),
        ("127.0.0.1:8080", AppTarget(addr=("127.0.0.1", 8080))),
        ("[::1]:8080", AppTarget(addr=("::1", 8080))),
    ],
)
def test_app_targets(text: str, target: AppTarget) -> None:
    assert parse_app_target(text) == target


@pytest.mark.parametrize(
    "text", ["", "pid:", "pid:x", "pid:0", "0", "port:0", "port:70000", "x:0", "app", "h:p"]
)
def test_bad_app_targets(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_app_target(text)


def test_app_target_names() -> None:
    assert str(AppTarget(pid=7)) == "pid 7"
    assert str(AppTarget(addr=("::1", 80))) == "port [::1]:80"


def test_a_pid_must_exist_at_start_up_a_port_need_not() -> None:
    with pytest.raises(UsageError, match=f"no process with pid {PID_BEYOND_PID_MAX}.*port:"):
        check_app_target(AppTarget(pid=PID_BEYOND_PID_MAX))
    check_app_target(AppTarget(pid=os.getpid()))
    check_app_target(AppTarget(addr=("127.0.0.1", 1)))  # nothing listens there: fine


# --------------------------------------------------------------------------- meshproxy wait


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_wait_returns_at_the_first_200() -> None:
    clock = FakeClock()
    answers = iter(["connection refused", "HTTP 503", None])
    deadlines: list[float] = []

    def probe(deadline: float) -> str | None:
        deadlines.append(deadline)
        clock.now += 0.01
        return next(answers)

    r = poll_until_ready(probe, 60.0, 0.5, 0.5, clock, clock.sleep)
    assert r.ready and r.attempts == 3 and r.last == "HTTP 200"
    assert clock.sleeps == [0.5, 0.5]  # the first attempt is immediate
    assert deadlines == [0.5, 0.5, 0.5]
    assert r.elapsed == pytest.approx(1.03)


def test_wait_gives_up_at_the_timeout_with_the_last_problem() -> None:
    clock = FakeClock()

    def probe(deadline: float) -> str | None:
        clock.now += deadline  # every attempt takes its whole deadline
        return "HTTP 503"

    r = poll_until_ready(probe, 2.0, 0.2, 0.5, clock, clock.sleep)
    assert not r.ready and r.last == "HTTP 503"
    # attempts of 0.5 s and pauses of 0.2 s: 0.5 + 0.2 + 0.5 + 0.2 + 0.5, then the pause is
    # cut to the 0.1 s left and no fourth attempt starts at the deadline
    assert r.attempts == 3 and clock.sleeps == [0.2, 0.2, pytest.approx(0.1)]
    assert r.elapsed == pytest.approx(2.0)


def test_wait_never_probes_after_the_deadline() -> None:
    clock = FakeClock()
    calls = 0

    def probe(deadline: float) -> str | None:
        nonlocal calls
        calls += 1
        assert deadline > 0
        clock.now += 0.4
        return "HTTP 500"

    r = poll_until_ready(probe, 1.0, 1.0, 1.0, clock, clock.sleep)
    assert calls == 1 and not r.ready and r.elapsed == pytest.approx(1.0)


def test_wait_urls() -> None:
    assert parse_http_url("http://127.0.0.1:15021/healthz/ready") == (
        "127.0.0.1",
        15021,
        "/healthz/ready",
    )
    assert parse_http_url("http://[::1]/x?y=1") == ("::1", 80, "/x?y=1")
    for bad in ("https://h/x", "127.0.0.1:15021", "http:///x", "http://h:99999/"):
        with pytest.raises(ValueError):
            parse_http_url(bad)


# --------------------------------------------------------------------------- stop rule, line


def test_drain_window() -> None:
    assert drain_window(5.0, 5.0) == (5.0, 5.0)  # Istio's defaults: 5 s, like its sleep
    assert drain_window(30.0, 1.0) == (1.0, 30.0)
    assert drain_window(2.0, 10.0) == (2.0, 2.0)  # the minimum never outlasts the maximum


def test_stop_order() -> None:
    assert sidecar_stop("auto", inbound=True) and not sidecar_stop("auto", inbound=False)
    assert sidecar_stop("sidecar", inbound=False)  # a pod that declares no port
    assert not sidecar_stop("drain", inbound=True)


def test_listening_line_names_health_and_metrics_when_on() -> None:
    out, admin = ("127.0.0.1", 1), ("127.0.0.1", 2)
    assert listening_line(out, admin) == "listening outbound=127.0.0.1:1 admin=127.0.0.1:2"
    assert listening_line(out, admin, None, ("0.0.0.0", 3), ("::", 4)) == (
        "listening outbound=127.0.0.1:1 admin=127.0.0.1:2 health=0.0.0.0:3 metrics=[::]:4"
    )


# --------------------------------------------------------------------------- restricted admin


class Backend:
    def __init__(self) -> None:
        self.ready = True
        self.drained = False

    async def is_ready(self) -> bool:
        return self.ready

    async def config_dump(self, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        return {}

    async def clusters(self) -> dict[str, Any]:
        return {"clusters": []}

    async def stats_export(self) -> Any:
        return Metrics(ProxyIdentity()).export()

    async def drain(self) -> None:
        self.drained = True

    def request_quit(self) -> None:
        raise AssertionError("never reachable from a restricted listener")


async def test_health_listener_serves_only_healthz_ready() -> None:
    backend = Backend()
    health = Admin(backend, only=frozenset({"/healthz/ready"}))
    assert (await health.dispatch(AdminRequest("GET", "/healthz/ready", {}))).status == 200
    backend.ready = False
    assert (await health.dispatch(AdminRequest("GET", "/healthz/ready", {}))).status == 503
    for method, path in (("POST", "/quitquitquit"), ("POST", "/drain"), ("GET", "/ready")):
        assert (await health.dispatch(AdminRequest(method, path, {}))).status == 404
    assert not backend.drained


async def test_metrics_listener_serves_only_the_prometheus_text() -> None:
    metrics = Admin(Backend(), only=frozenset({"/stats/prometheus"}))
    resp = await metrics.dispatch(AdminRequest("GET", "/stats/prometheus", {}))
    assert resp.status == 200 and b"istio_requests_total" in resp.body
    for path in ("/config_dump", "/clusters", "/", "/healthz/ready"):
        assert (await metrics.dispatch(AdminRequest("GET", path, {}))).status == 404


async def test_admin_also_answers_healthz_ready() -> None:
    backend = Backend()
    admin = Admin(backend)
    assert (await admin.dispatch(AdminRequest("GET", "/healthz/ready", {}))).status == 200
    assert (await admin.dispatch(AdminRequest("POST", "/drain", {}))).status == 200


# --------------------------------------------------------------------------- app probes


def test_app_probers_parse_istio_format() -> None:
    got = parse_app_probers(
        '{"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, '
        '"scheme": "HTTPS", "httpHeaders": [{"name": "X-A", "value": "1"}]}, '
        '"timeoutSeconds": 3}, "/app-health/web/livez": {"tcpSocket": {"port": 9000}}}'
    )
    assert got == {
        "/app-health/web/readyz": AppProber(
            8080, path="/ready", https=True, headers=(("X-A", "1"),), timeout=3.0
        ),
        "/app-health/web/livez": AppProber(9000, tcp=True, timeout=1.0),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ("[]", "expected a JSON object"),
        ('{"/x": {"tcpSocket": {"port": 1}}}', "/x: a path must start with /app-health/"),
        ('{"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}', "tcpSocket.port"),
        ('{"/app-health/a/livez": {"exec": {}}}', "exactly one of httpGet, tcpSocket"),
        ('{"/app-health/a/livez": {"httpGet": {"port": 1, "scheme": "FTP"}}}', "scheme"),
        ('{"/app-health/a/livez": {"httpGet": {"port": 1}, "timeoutSeconds": 0}}', "timeout"),
        ('{"/app-health/a/livez": {"httpGet": {"port": 1, "path": "/a b"}}}', "httpGet.path"),
    ],
)
def test_bad_app_probers_exit_2(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "--config", "x", "--app-probers", text])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--app-probers" in err and message in err and "Traceback" not in err


async def _get(addr: tuple[str, int], path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_health_listener_performs_the_app_probes_over_real_sockets() -> None:
    """The kubelet's rewritten probe reaches --health's /app-health/...; the listener probes
    the real application on localhost: its 200 is 200, its 500 is 500, a redirect is
    success (the kubelet's 2xx/3xx), a closed port and a silent application are 503, a
    tcpSocket probe is a connect; the original headers and path go to the application."""
    seen: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        path = head.split()[1]
        if path == b"/silent":
            await asyncio.sleep(5)
        status = {b"/ready": 200, b"/broken": 500, b"/moved": 302}.get(path, 404)
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    app_server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = app_server.sockets[0].getsockname()[1]
    # https as the kubelet probes it: TLS, the certificate (of an unknown CA) not verified
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("app.internal").configure_cert(server_ctx)
    tls_server = await asyncio.start_server(app, "127.0.0.1", 0, ssl=server_ctx)
    tls_port = tls_server.sockets[0].getsockname()[1]
    closed = socket_port_closed()
    probers = {
        "/app-health/web/readyz": AppProber(port, path="/ready", headers=(("X-Probe", "k"),)),
        "/app-health/web/livez": AppProber(port, path="/broken"),
        "/app-health/web/startupz": AppProber(port, path="/moved"),
        "/app-health/tcp/livez": AppProber(port, tcp=True),
        "/app-health/tls/readyz": AppProber(tls_port, path="/ready", https=True),
        "/app-health/tls/livez": AppProber(tls_port, path="/broken", https=True),
        "/app-health/down/readyz": AppProber(closed, path="/ready"),
        "/app-health/down/livez": AppProber(closed, tcp=True),
        "/app-health/slow/readyz": AppProber(port, path="/silent", timeout=0.3),
    }
    status = StatusListeners(Backend(), probers)
    try:
        await status.start(("127.0.0.1", 0), None)
        assert status.health is not None
        assert (await _get(status.health, "/app-health/web/readyz"))[0] == 200
        head = seen[-1].decode().lower()
        assert head.startswith("get /ready http/1.1\r\n")
        assert "x-probe: k\r\n" in head and "user-agent: kube-probe/" in head
        assert (await _get(status.health, "/app-health/web/livez"))[0] == 500
        assert (await _get(status.health, "/app-health/web/startupz"))[0] == 200
        assert (await _get(status.health, "/app-health/tcp/livez"))[0] == 200
        assert (await _get(status.health, "/app-health/tls/readyz"))[0] == 200
        assert (await _get(status.health, "/app-health/tls/livez"))[0] == 500
        assert (await _get(status.health, "/app-health/down/readyz"))[0] == 503
        assert (await _get(status.health, "/app-health/down/livez"))[0] == 503
        started = time.monotonic()
        assert (await _get(status.health, "/app-health/slow/readyz"))[0] == 503
        assert time.monotonic() - started < 2
        assert (await _get(status.health, "/app-health/other/readyz"))[0] == 404
        assert (await _get(status.health, "/healthz/ready"))[0] == 200
    finally:
        await status.close()
        for server in (app_server, tls_server):
            server.close()
            await server.wait_closed()


def socket_port_closed() -> int:
    """A localhost port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- app watchers


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


async def test_watch_pid_returns_when_the_process_ends_even_unreaped() -> None:
    proc = sleeper()
    try:
        watch = asyncio.create_task(watch_app(AppTarget(pid=proc.pid), 0.05))
        await asyncio.sleep(0.3)
        assert not watch.done()
        os.kill(proc.pid, signal.SIGKILL)  # not reaped yet: a zombie, still "exists" to kill()
        await asyncio.wait_for(watch, 5)
    finally:
        proc.kill()
        proc.wait()


def test_pid_ended_without_pidfd_sees_zombies() -> None:
    proc = sleeper()
    try:
        assert not _pid_ended(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        for _ in range(100):
            if _pid_ended(proc.pid):
                break
            time.sleep(0.05)
        assert _pid_ended(proc.pid)  # a zombie (nobody reaped it): ended
    finally:
        proc.wait()
    assert _pid_ended(proc.pid)  # reaped: gone


async def test_watch_pid_of_a_process_already_gone_returns_at_once() -> None:
    await asyncio.wait_for(watch_app(AppTarget(pid=PID_BEYOND_PID_MAX), 0.05), 2)


async def test_watch_port_waits_for_a_first_accept_then_for_a_refusal() -> None:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    probe = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # the port is free now: nobody listens yet
    watch = asyncio.create_task(watch_app(AppTarget(addr=("127.0.0.1", port)), 0.05))
    try:
        await asyncio.sleep(0.4)
        assert not watch.done(), "a port that never accepted is not an app that is gone"
        server = await asyncio.start_server(serve, "127.0.0.1", port)
        await asyncio.sleep(0.4)
        assert not watch.done()
        server.close()
        await server.wait_closed()
        await asyncio.wait_for(watch, 5)
    finally:
        watch.cancel()


# --------------------------------------------------------------------------- inbound-only drain


async def test_inbound_only_drain_keeps_the_outbound_listener_accepting() -> None:
    async def app(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    app_server = await asyncio.start_server(app, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    dp = DataPlane(State(), Metrics(ProxyIdentity()), Settings())
    try:
        _, out_port = await dp.start_outbound("127.0.0.1", 0)
        _, in_port = await dp.start_inbound(
            "127.0.0.1", 0, ("127.0.0.1", app_port), ProxyIdentity()
        )
        dp.stop_accepting(inbound_only=True)
        dp.close_idle(inbound_only=True)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", in_port)
        r, w = await asyncio.open_connection("127.0.0.1", out_port)
        w.write(b"GET / HTTP/1.1\r\nhost: nowhere\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 404")  # served (no route), not refused
        assert b"connection: close" not in head.lower()  # the outbound side is not draining
        assert not await dp.wait_no_connections(0.2)  # the kept-alive connection is open
        w.close()
        assert await dp.wait_no_connections(5)
        assert dp.active_connections == 0
    finally:
        await dp.close()
        app_server.close()
        await app_server.wait_closed()


# --------------------------------------------------------------------------- run flags


def test_run_flags_parse_into_run_options() -> None:
    argv = ["run", "--config", "x", "--health", "0.0.0.0:15021", "--metrics", "[::]:15090"]
    ns = build_parser().parse_args(
        [*argv, "--min-drain-seconds", "1.5", "--exit-with-app", "port:8080"]
    )
    assert ns.health == ("0.0.0.0", 15021) and ns.metrics == ("::", 15090)
    assert ns.min_drain_seconds == 1.5
    assert ns.exit_with_app == AppTarget(addr=("127.0.0.1", 8080))
    defaults = build_parser().parse_args(["run", "--config", "x"])
    assert defaults.health is None and defaults.metrics is None
    assert defaults.exit_with_app is None
    assert defaults.min_drain_seconds == Settings().min_drain_seconds == 5.0


@pytest.mark.parametrize(
    "flags",
    [
        ["--health", "15021"],
        ["--metrics", "host"],
        ["--min-drain-seconds", "-1"],
        ["--exit-with-app", "pid:-3"],
    ],
)
def test_bad_run_flags_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "--config", "x", *flags])
    assert e.value.code == 2
    assert flags[0] in capsys.readouterr().err
