"""Resilience end to end through the real CLI: ``python -m meshproxy run --config FIXTURE
--access-log FILE`` as a subprocess in front of scripted misbehaving upstreams.

Theory of operation
-------------------
Each test takes one Istio YAML fixture from ``tests/data/resilience/`` (valid as it stands:
the last test runs ``meshproxy validate`` on each), replaces its placeholder endpoint ports
(59001..59199) with the ports of upstreams it starts on 127.0.0.1 (a :class:`Script` answering per
request: status sequences, delays before the head, resets before / after the head, slow
bodies) or with a closed port, starts the proxy on OS-chosen ports, waits for ``/ready`` and
then checks only the public surface: HTTP answers, the access-log JSON lines (``attempts``,
``response_flags``), ``/stats/prometheus`` counters and ``/clusters``. The proxy is stopped
by its PID (SIGTERM, then SIGKILL if it lingers). Time bounds are generous; each test would
fail if the feature it names were missing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.proxyproc import (
    REPO,
    MeshProxy,
    meshproxy_argv,
    request_samples,
    wait_until,
)
from tests.support.misbehaving_upstream import (
    Script,
    closed_port,
    reset_after_head,
    reset_before_head,
    slow_body,
    start,
    status,
)
from tests.support.rawhttp import Response, get, read_response
from tests.support.upstream import Recorded, Reply, UpstreamServer

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "resilience"
PLACEHOLDER = re.compile(r"\b59[01]\d\d\b")
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)


# --------------------------------------------------------------------------- harness


def render(fixture: str, ports: dict[int, int], out_dir: Path) -> Path:
    """The fixture with each placeholder port replaced by a real one (in one pass, so a real
    port that looks like a placeholder is left alone), written to ``out_dir``."""
    text = (FIXTURES / fixture).read_text()
    found = {int(m) for m in PLACEHOLDER.findall(text)}
    assert found == set(ports), f"{fixture}: placeholders {sorted(found)}, given {sorted(ports)}"
    text = PLACEHOLDER.sub(lambda m: str(ports[int(m.group())]), text)
    path = out_dir / fixture
    path.write_text(text)
    return path


@dataclass
class Running:
    proxy: MeshProxy
    access_log: Path
    session: aiohttp.ClientSession

    async def request(
        self,
        host: str,
        path: str = "/",
        method: str = "GET",
        data: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        url = f"http://{self.proxy.outbound}{path}"
        async with self.session.request(method, url, headers={"Host": host}, data=data) as r:
            body = await r.read()
            return r.status, dict(r.headers), body

    async def timed(self, host: str, path: str = "/") -> tuple[int, float]:
        t0 = time.monotonic()
        code, _, _ = await self.request(host, path)
        return code, time.monotonic() - t0

    async def entries(self, at_least: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The access log's JSON lines, once there are ``at_least`` (it is flushed ~100 ms)."""
        found: list[dict[str, Any]] = []

        def ready() -> bool:
            nonlocal found
            text = self.access_log.read_text() if self.access_log.exists() else ""
            found = [json.loads(line) for line in text.splitlines() if line.strip()]
            return len(found) >= at_least

        await wait_until(ready, timeout)
        return found

    async def entry_for(self, path: str, timeout: float = 5.0) -> dict[str, Any]:
        """The one access-log entry of the request to ``path``."""
        got: list[dict[str, Any]] = []

        def ready() -> bool:
            nonlocal got
            text = self.access_log.read_text() if self.access_log.exists() else ""
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            got = [e for e in lines if e["path"] == path]
            return bool(got)

        await wait_until(ready, timeout)
        assert len(got) == 1, got
        return got[0]

    async def metric(self, name: str) -> float:
        """A ``meshproxy_*`` counter or gauge from ``/stats/prometheus``, summed over its
        clusters (0 when it has no sample)."""
        code, text = await self.proxy.admin_get("/stats/prometheus")
        assert code == 200
        return sum(s.value for s in request_samples(text, name))

    async def endpoint(self, port: int) -> dict[str, Any]:
        """The ``/clusters`` entry of the endpoint 127.0.0.1:``port``."""
        code, view = await self.proxy.admin_get("/clusters")
        assert code == 200, view
        for c in view["clusters"]:
            for ep in c["endpoints"]:
                if ep["address"] == f"127.0.0.1:{port}":
                    return ep
        raise AssertionError(f"no endpoint 127.0.0.1:{port} in {view}")


@asynccontextmanager
async def meshproxy(
    tmp_path: Path, fixture: str, ports: dict[int, int], extra: Sequence[str] = ()
) -> AsyncIterator[Running]:
    cfg = render(fixture, ports, tmp_path)
    log = tmp_path / "access.log"
    p = MeshProxy(
        [cfg], extra=["--access-log", str(log), *extra], log_path=tmp_path / "meshproxy.log"
    )
    try:
        await p.start()

        async def ready() -> bool:
            return (await p.admin_get("/ready"))[0] == 200

        await wait_until(ready, 10)
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            yield Running(p, log, session)
        assert await p.stop() == 0, p.stderr()
        assert "Traceback" not in p.stderr(), p.stderr()
    finally:
        await p.kill()


def flags(entry: dict[str, Any]) -> set[str]:
    return set(entry["response_flags"].split(","))


def attempt_counts(up: UpstreamServer, path: str) -> list[str | None]:
    return [r.header("x-envoy-attempt-count") for r in up.requests if r.target == path]


# --------------------------------------------------------------------------- 1. retries


@pytest.mark.parametrize("workers", [1, 2])
async def test_retry_on_5xx_turns_503_then_200_into_200(tmp_path: Path, workers: int) -> None:
    up = await start(Script([status(503), status(200, body=b"second")]))
    try:
        extra = ["--workers", str(workers)]  # with 2, /stats/prometheus sums the workers
        async with meshproxy(tmp_path, "retry-5xx.yaml", {59001: up.port}, extra) as m:
            code, _, body = await m.request("flaky", "/once")
            assert (code, body) == (200, b"second")
            assert attempt_counts(up, "/once") == ["1", "2"]
            e = await m.entry_for("/once")
            assert e["response_code"] == 200 and e["attempts"] == 2, e
            assert e["response_flags"] == "-", e
            assert e["upstream_host"] == f"127.0.0.1:{up.port}", e
            assert await m.metric("meshproxy_upstream_retries_total") == 1
    finally:
        await up.close()


# --------------------------------------------------------------------------- 2. default policy


async def test_default_policy_retries_connect_failure_to_the_good_endpoint(
    tmp_path: Path,
) -> None:
    good = await start(status(200))
    dead = closed_port()
    try:
        ports = {59011: dead, 59012: good.port, 59013: closed_port()}
        async with meshproxy(tmp_path, "default-policy.yaml", ports) as m:
            codes = [(await m.request("pair", f"/r{i}"))[0] for i in range(20)]
            assert codes == [200] * 20
            entries = await m.entries(20)
            assert all(e["upstream_host"] == f"127.0.0.1:{good.port}" for e in entries), entries
            # the closed port was tried at least once and that try was retried (not luck)
            assert any(e["attempts"] == 2 for e in entries), entries
            assert await m.metric("meshproxy_upstream_retries_total") >= 1
    finally:
        await good.close()


async def test_default_policy_never_retries_a_post_but_retries_an_idempotent_503(
    tmp_path: Path,
) -> None:
    up = await start(Script([status(503), status(200, body=b"fine")]))
    good = await start(status(200))
    try:
        ports = {59011: good.port, 59012: good.port, 59013: up.port}
        async with meshproxy(tmp_path, "default-policy.yaml", ports) as m:
            code, _, _ = await m.request("unavailable", "/post", method="POST", data=b"once")
            assert code == 503
            posts = [r for r in up.requests if r.target == "/post"]
            assert len(posts) == 1 and posts[0].body == b"once"
            code, _, body = await m.request("unavailable", "/get")
            assert (code, body) == (200, b"fine")
            assert attempt_counts(up, "/get") == ["1", "2"]
            post_e, get_e = await m.entry_for("/post"), await m.entry_for("/get")
            assert post_e["attempts"] == 1 and post_e["response_code"] == 503, post_e
            assert get_e["attempts"] == 2 and get_e["response_code"] == 200, get_e
    finally:
        await up.close()
        await good.close()


# --------------------------------------------------------------------------- 3. route timeout


async def test_route_timeout_is_504_ut(tmp_path: Path) -> None:
    up = await start(status(200, delay=3.0))
    try:
        async with meshproxy(tmp_path, "timeout.yaml", {59021: up.port}) as m:
            code, elapsed = await m.timed("sluggish", "/slow")
            assert code == 504
            assert 0.4 <= elapsed < 2.5, elapsed
            e = await m.entry_for("/slow")
            assert e["response_code"] == 504 and "UT" in flags(e), e
    finally:
        await up.close()


# --------------------------------------------------------------------------- 4. perTryTimeout


async def test_per_try_timeout_retries_the_slow_endpoint_on_the_fast_one(tmp_path: Path) -> None:
    slow = await start(status(200, delay=3.0, body=b"slow"))
    fast = await start(status(200, body=b"fast"))
    try:
        ports = {59031: slow.port, 59032: fast.port}
        async with meshproxy(tmp_path, "per-try-timeout.yaml", ports) as m:
            for i in range(6):
                t0 = time.monotonic()
                code, _, body = await m.request("mixed", f"/p{i}")
                assert (code, body) == (200, b"fast"), (i, code, body)
                assert time.monotonic() - t0 < 2.5
            assert slow.requests, "round robin never reached the slow endpoint"
            entries = await m.entries(6)
            assert any(e["attempts"] >= 2 for e in entries), entries
            assert all(e["upstream_host"] == f"127.0.0.1:{fast.port}" for e in entries), entries
    finally:
        await slow.close()
        await fast.close()


# --------------------------------------------------------------------------- 5. faults


async def test_fault_abort_418_fi_and_delay_di(tmp_path: Path) -> None:
    up = await start(status(200, body=b"reached"))
    try:
        async with meshproxy(tmp_path, "fault.yaml", {59041: up.port}) as m:
            code, _, _ = await m.request("teapot", "/abort")
            assert code == 418
            assert not [r for r in up.requests if r.target == "/abort"]
            e = await m.entry_for("/abort")
            assert e["response_code"] == 418 and "FI" in flags(e), e

            t0 = time.monotonic()
            code, _, body = await m.request("lagged", "/delay")
            elapsed = time.monotonic() - t0
            assert (code, body) == (200, b"reached")
            assert elapsed >= 0.3, elapsed
            e = await m.entry_for("/delay")
            assert e["response_code"] == 200 and "DI" in flags(e), e

            # an abort without percentage affects no request (Istio's rule)
            code, _, body = await m.request("spared", "/spared")
            assert (code, body) == (200, b"reached")
            e = await m.entry_for("/spared")
            assert e["response_flags"] == "-", e
    finally:
        await up.close()


# --------------------------------------------------------------------------- 6. mirror


async def test_mirror_gets_shadow_host_and_never_holds_the_primary(tmp_path: Path) -> None:
    primary = await start(status(200, body=b"primary"))
    # the mirror is slow: its answer must not delay the primary's
    shadow = await start(status(200, delay=1.5, body=b"mirror"))
    try:
        ports = {59051: primary.port, 59052: shadow.port}
        async with meshproxy(tmp_path, "mirror.yaml", ports) as m:
            for i in range(5):
                t0 = time.monotonic()
                code, _, body = await m.request("primary", f"/m{i}")
                assert (code, body) == (200, b"primary")
                assert time.monotonic() - t0 < 1.2
            await wait_until(lambda: len(shadow.requests) >= 5, 5)
            assert sorted(r.target for r in shadow.requests) == [f"/m{i}" for i in range(5)]
            assert {r.header("host") for r in shadow.requests} == {"primary-shadow"}
            assert {r.header("host") for r in primary.requests} == {"primary"}

            await shadow.close()  # the mirror's port is closed now
            for i in range(5):
                code, _, body = await m.request("primary", f"/after{i}")
                assert (code, body) == (200, b"primary")
            assert len(shadow.requests) == 5
    finally:
        await primary.close()
        await shadow.close()


# --------------------------------------------------------------------------- 7. outlier


async def test_outlier_detection_ejects_the_503_endpoint_of_three(tmp_path: Path) -> None:
    bad = await start(status(503))
    goods = [await start(status(200)) for _ in range(2)]
    try:
        ports = {59061: bad.port, 59062: goods[0].port, 59063: goods[1].port}
        async with meshproxy(tmp_path, "outlier.yaml", ports) as m:
            ejected = False
            for i in range(60):
                await m.request("trio", f"/warm{i}")
                if (await m.endpoint(bad.port))["ejected"]:
                    ejected = True
                    break
            assert ejected, await m.endpoint(bad.port)
            ep = await m.endpoint(bad.port)
            assert ep["ejections"] >= 1 and ep["healthy"] is False, ep
            for g in goods:
                assert (await m.endpoint(g.port))["ejected"] is False
            assert await m.metric("meshproxy_outlier_ejections_total") >= 1
            log_lines = m.proxy.stderr().splitlines()
            assert any("eject" in ln and f"127.0.0.1:{bad.port}" in ln for ln in log_lines)
            bad_hits = len(bad.requests)
            assert bad_hits >= 3  # consecutive5xxErrors: 3
            codes = [(await m.request("trio", f"/after{i}"))[0] for i in range(30)]
            assert codes == [200] * 30
            assert len(bad.requests) == bad_hits
    finally:
        await bad.close()
        for g in goods:
            await g.close()


# --------------------------------------------------------------------------- 8. pool limits


async def _pool_burst(tmp_path: Path, warm: bool) -> None:
    """4 simultaneous requests through maxConnections 1 / http1MaxPendingRequests 1 to an
    upstream taking 1 s: one is served, one waits for that connection, two overflow at once.

    "Simultaneous" is made exact: the 4 client connections are accepted first, then the proxy
    is paused (SIGSTOP) while the 4 requests are written and resumed (SIGCONT), so it reads
    all 4 in one event-loop pass, as under any real burst."""
    up = await start(status(200, delay=1.0, body=b"slow ok"))
    try:
        async with meshproxy(tmp_path, "connection-pool.yaml", {59071: up.port}) as m:
            if warm:  # one connection established and idle in the pool before the burst
                assert (await m.request("narrow", "/warm"))[0] == 200
            host, _, port = m.proxy.outbound.rpartition(":")
            conns = [await asyncio.open_connection(host, int(port)) for _ in range(4)]

            async def accepted() -> bool:
                return await m.metric("meshproxy_downstream_connections_active") >= 4

            await wait_until(accepted, 5)
            t0 = time.monotonic()
            m.proxy.signal(signal.SIGSTOP)
            try:
                for i, (_, w) in enumerate(conns):
                    w.write(get(f"/c{i}", host="narrow"))
                    await w.drain()
            finally:
                m.proxy.signal(signal.SIGCONT)

            async def one(r: asyncio.StreamReader) -> tuple[Response, float]:
                resp = await read_response(r, timeout=10)
                return resp, time.monotonic() - t0

            try:
                results = await asyncio.gather(*(one(r) for r, _ in conns))
            finally:
                for _, w in conns:
                    w.close()
            ok = [r for r, _ in results if r.status == 200]
            over = [(r, t) for r, t in results if r.status == 503]
            assert len(ok) + len(over) == 4, results
            assert ok and over, results
            for resp, elapsed in over:
                assert resp.header("x-envoy-overloaded") == "true", resp
                assert elapsed < 0.9, elapsed  # refused at once, not after the slow one
            assert up.connections == 1, up.connections
            entries = await m.entries(4 + warm)
            uo = [e for e in entries if e["response_code"] == 503]
            assert len(uo) == len(over) and all("UO" in flags(e) for e in uo), entries
            assert await m.metric("meshproxy_upstream_overflows_total") > 0
            # the overflowed requests never reached the upstream (and were not retried)
            assert len(up.requests) == len(ok) + warm
    finally:
        await up.close()


async def test_connection_pool_overflow_is_503_uo_at_once(tmp_path: Path) -> None:
    await _pool_burst(tmp_path, warm=True)


# (a regression guard: connections still connecting must count against maxConnections, as
# in Envoy; fixed in 1766ec0 "pool: a connect holds its maxConnections slot ...")
async def test_connection_pool_overflow_on_a_cold_burst(tmp_path: Path) -> None:
    await _pool_burst(tmp_path, warm=False)


# --------------------------------------------------------------------------- 9. retry budget


async def test_retry_budget_overflows_under_concurrent_503s(tmp_path: Path) -> None:
    # every attempt is answered 503 after 0.2 s; the upstream notes when each retry arrives
    retry_arrivals: list[float] = []

    def handler(req: Recorded) -> Reply:
        if req.header("x-envoy-attempt-count") != "1":
            retry_arrivals.append(time.monotonic())
        return status(503, delay=0.2)

    up = await start(handler)
    try:
        async with meshproxy(tmp_path, "retry-budget.yaml", {59081: up.port}) as m:
            async with asyncio.timeout(20):
                results = await asyncio.gather(*(m.request("broken", f"/b{i}") for i in range(20)))
            assert [r[0] for r in results] == [503] * 20
            assert await m.metric("meshproxy_upstream_retry_overflows_total") > 0
            # without any budget: 20 x (1 + 3) attempts
            assert 20 <= len(up.requests) < 80, len(up.requests)
            assert await m.metric("meshproxy_upstream_retries_total") == len(retry_arrivals)
            # percent 0 / minRetryConcurrency 1: one retry at a time, so retries reach the
            # upstream at least one 0.2 s answer apart (meshproxy's default budget, 20 % of
            # 20 active requests, would let 4 go at once)
            gaps = [b - a for a, b in itertools.pairwise(retry_arrivals)]
            assert retry_arrivals and all(g > 0.1 for g in gaps), gaps
    finally:
        await up.close()


# --------------------------------------------------------------------------- resets, slow body


async def test_reset_before_head_is_retried_on_reset(tmp_path: Path) -> None:
    up = await start(Script([reset_before_head(), status(200, body=b"again")]))
    try:
        async with meshproxy(tmp_path, "resets.yaml", {59091: up.port}) as m:
            code, _, body = await m.request("resetty", "/rst")
            assert (code, body) == (200, b"again")
            assert attempt_counts(up, "/rst") == ["1", "2"]
            e = await m.entry_for("/rst")
            assert e["attempts"] == 2 and e["response_code"] == 200, e
    finally:
        await up.close()


async def test_reset_after_head_is_not_retried(tmp_path: Path) -> None:
    up = await start(Script([reset_after_head(declared=1000, sent=b"partial")]))
    try:
        async with meshproxy(tmp_path, "resets.yaml", {59091: up.port}) as m:
            complete = False
            try:
                code, _, body = await m.request("resetty", "/late")
                complete = code == 200 and len(body) == 1000
            except aiohttp.ClientError:
                pass
            assert not complete
            await asyncio.sleep(0.3)  # a (wrong) retry would reach the upstream by now
            assert len([r for r in up.requests if r.target == "/late"]) == 1
            e = await m.entry_for("/late")  # as in Envoy: the status already sent, flag UC
            assert e["response_code"] == 200 and "UC" in flags(e) and e["attempts"] == 1, e
    finally:
        await up.close()


async def test_slow_body_outlives_per_try_timeout(tmp_path: Path) -> None:
    # the head comes at once, the body over ~0.6 s: perTryTimeout 0.3s no longer applies
    up = await start(slow_body(chunks=6, every=0.1, piece=b"y" * 64))
    try:
        async with meshproxy(tmp_path, "resets.yaml", {59091: up.port}) as m:
            code, _, body = await m.request("trickle", "/trickle")
            assert (code, body) == (200, b"y" * 384)
            assert attempt_counts(up, "/trickle") == ["1"]
            e = await m.entry_for("/trickle")
            assert e["attempts"] == 1 and e["response_flags"] == "-", e
    finally:
        await up.close()


# --------------------------------------------------------------------------- retry edges


def _edges(up: int, dead: int | None = None) -> dict[int, int]:
    return {59101: up, 59102: dead if dead is not None else closed_port()}


async def test_route_timeout_covers_every_retry_and_backoff(tmp_path: Path) -> None:
    up = await start(status(503, delay=0.2))
    try:
        async with meshproxy(tmp_path, "retry-edges.yaml", _edges(up.port)) as m:
            code, elapsed = await m.timed("deadline", "/d")
            assert code == 504
            assert 0.4 <= elapsed < 1.5, elapsed  # 6 tries of 0.2 s would take 1.2 s or more
            e = await m.entry_for("/d")
            assert "UT" in flags(e) and e["attempts"] >= 2, e
    finally:
        await up.close()


async def test_retries_replay_a_small_body_but_not_one_over_1_mib(tmp_path: Path) -> None:
    up = await start(Script([status(503), status(200, body=b"replayed")]))
    try:
        async with meshproxy(tmp_path, "retry-edges.yaml", _edges(up.port)) as m:
            small = b"s" * 1000
            code, _, body = await m.request("replay", "/small", method="POST", data=small)
            assert (code, body) == (200, b"replayed")
            assert [r.body for r in up.requests if r.target == "/small"] == [small, small]

            big = b"b" * (1024 * 1024 + 512 * 1024)
            code, _, _ = await m.request("replay", "/big", method="POST", data=big)
            assert code == 503
            bigs = [r for r in up.requests if r.target == "/big"]
            assert len(bigs) == 1 and bigs[0].body == big
            e = await m.entry_for("/big")
            assert e["attempts"] == 1 and e["bytes_received"] == len(big), e
    finally:
        await up.close()


async def test_503_with_x_envoy_overloaded_is_never_retried(tmp_path: Path) -> None:
    overloaded = Reply(status=503, reason="X", headers=[("x-envoy-overloaded", "true")])
    up = await start(Script([overloaded, status(200)]))
    try:
        async with meshproxy(tmp_path, "retry-edges.yaml", _edges(up.port)) as m:
            code, _, _ = await m.request("overloaded", "/o")
            assert code == 503
            assert attempt_counts(up, "/o") == ["1"]
            e = await m.entry_for("/o")
            assert e["attempts"] == 1, e
    finally:
        await up.close()


async def test_connect_failures_exhausting_retries_are_503_urx(tmp_path: Path) -> None:
    up = await start(status(200))
    try:
        async with meshproxy(tmp_path, "retry-edges.yaml", _edges(up.port)) as m:
            code, _, _ = await m.request("nowhere", "/n")
            assert code == 503
            e = await m.entry_for("/n")
            assert "URX" in flags(e) and e["attempts"] == 3, e
            assert await m.metric("meshproxy_upstream_retries_total") == 2
    finally:
        await up.close()


# --------------------------------------------------------------------------- retryOn tokens


async def test_retry_on_tokens(tmp_path: Path) -> None:
    # the first request to each path gets the status under test, a retry gets 200
    first = {"/teapot": 418, "/conflict": 409, "/other4xx": 404, "/502": 502, "/500": 500}
    seen: dict[str, int] = {}

    def handler(req: Recorded) -> Reply:
        seen[req.target] = seen.get(req.target, 0) + 1
        return status(first[req.target]) if seen[req.target] == 1 else status(200, body=b"ok")

    up = await start(handler)
    try:
        async with meshproxy(tmp_path, "retry-on.yaml", {59111: up.port}) as m:
            cases = [
                ("codes", "/teapot", 200, 2),  # a bare status code in retryOn
                ("conflict", "/conflict", 200, 2),  # retriable-4xx: 409
                ("conflict", "/other4xx", 404, 1),  # retriable-4xx: not 404
                ("gateway", "/502", 200, 2),  # gateway-error: 502
                ("gateway", "/500", 500, 1),  # gateway-error: not 500
            ]
            for host, path, code, attempts in cases:
                got, _, _ = await m.request(host, path)
                assert got == code, (host, path, got)
                assert len(attempt_counts(up, path)) == attempts, (host, path)
                e = await m.entry_for(path)
                assert e["attempts"] == attempts, e
    finally:
        await up.close()


# --------------------------------------------------------------------------- 10. validate


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.yaml")))
def test_validate_accepts_fixture(fixture: str) -> None:
    proc = subprocess.run(
        meshproxy_argv("validate", str(FIXTURES / fixture)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "", proc.stdout
    assert "Traceback" not in proc.stderr


def test_every_fixture_is_covered() -> None:
    """Every fixture is used by a test above, and README.md says what they are."""
    source = Path(__file__).read_text()
    names = sorted(p.name for p in FIXTURES.glob("*.yaml"))
    assert len(names) >= 9
    for name in names:
        assert f'"{name}"' in source, name
    assert (FIXTURES / "README.md").read_text().strip()
