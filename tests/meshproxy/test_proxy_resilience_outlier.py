"""Outlier detection and stale keep-alive replay through the real data path.

Outlier detection: three endpoints, one always answering 503, requests sent one at a time (so
which endpoint a request went to is what the upstreams recorded). The ejection, its visibility
in ``/clusters`` and in the metrics, the traffic stopping and the endpoint's return after its
ejection time are asserted; Envoy's exact 10 % rule (``outlier_min_ejectable=0``) is the
counter-case. Stale keep-alive: the upstream closes a pooled connection as the next request
arrives on it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from meshproxy.config.model import OutlierPolicy
from tests.support.dataplane import RunningPlane, running_dataplane
from tests.support.fakes import cluster, to_cluster
from tests.support.rawhttp import get, read_response, request
from tests.support.resilience import fast_settings, route_snapshot, wait_quiescent
from tests.support.upstream import Recorded, Reply, UpstreamServer

OUTLIER = OutlierPolicy(
    consecutive_5xx=3, interval=0.2, base_ejection_time=0.5, max_ejection_percent=10
)


def outlier_snap(ports: list[int]):  # type: ignore[no-untyped-def]
    # no retries: every 503 reaches the client, so the counts below are exact
    return route_snapshot(
        "svc", to_cluster("svc", retries=None), [cluster("svc", ports, outlier=OUTLIER)]
    )


def endpoint_view(p: RunningPlane, port: int) -> dict[str, Any]:
    (c,) = p.dp.clusters_view()["clusters"]
    return next(e for e in c["endpoints"] if e["address"] == f"127.0.0.1:{port}")


async def send_until(p: RunningPlane, pred, limit: int = 200) -> int:  # type: ignore[no-untyped-def]
    """Send GETs one at a time until ``pred()``; returns how many were sent."""
    for i in range(limit):
        if pred():
            return i
        await request(p.host, p.port, get())
    assert pred(), f"condition not met after {limit} requests"
    return limit


async def test_consecutive_5xx_ejects_small_pool_endpoint_and_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="meshproxy.upstream.pool")
    async with (
        UpstreamServer(Reply(503, body=b"bad")) as bad,
        UpstreamServer(Reply(body=b"good")) as g1,
        UpstreamServer(Reply(body=b"good")) as g2,
    ):
        async with running_dataplane(outlier_snap([bad.port, g1.port, g2.port])) as p:
            await send_until(p, lambda: len(bad.requests) >= 3)
            assert len(bad.requests) == 3
            view = endpoint_view(p, bad.port)
            assert view["ejected"] is True and view["healthy"] is False
            assert view["ejections"] == 1
            assert p.metrics.count("ejections") == 1
            ejected_logs = [r for r in caplog.records if "ejected" in r.getMessage()]
            assert len(ejected_logs) == 1 and f"127.0.0.1:{bad.port}" in ejected_logs[0].message
            assert "consecutive_5xx" in ejected_logs[0].message
            # ejected: no traffic goes there for its ejection time (0.5 s)
            for _ in range(20):
                r = await request(p.host, p.port, get())
                assert (r.status, r.body) == (200, b"good")
            assert len(bad.requests) == 3
            assert endpoint_view(p, g1.port)["ejected"] is False
            # after base_ejection_time + one interval the sweep returns it
            await asyncio.sleep(0.5 + 0.2 + 0.15)
            view = endpoint_view(p, bad.port)
            assert view["ejected"] is False and view["healthy"] is True
            assert view["ejections"] == 1
            assert any("returned to the load balancer" in r.getMessage() for r in caplog.records)
            await send_until(p, lambda: len(bad.requests) >= 4)
            await wait_quiescent(p, "svc")


async def test_envoy_ten_percent_rule_forbids_ejection_in_a_small_pool() -> None:
    async with (
        UpstreamServer(Reply(503, body=b"bad")) as bad,
        UpstreamServer(Reply(body=b"good")) as g1,
        UpstreamServer(Reply(body=b"good")) as g2,
    ):
        snap = outlier_snap([bad.port, g1.port, g2.port])
        async with running_dataplane(snap, fast_settings(outlier_min_ejectable=0)) as p:
            await send_until(p, lambda: len(bad.requests) >= 8)
            view = endpoint_view(p, bad.port)
            assert view["ejected"] is False and view["ejections"] == 0
            assert p.metrics.count("ejections") == 0


async def test_connect_failures_eject_an_endpoint_too() -> None:
    """Local-origin failures count as 503s when not split (Envoy's default)."""
    async with UpstreamServer(Reply(body=b"good")) as g1, UpstreamServer(Reply()) as g2:
        dead = UpstreamServer()
        await dead.start()
        dead_port = dead.port
        await dead.close()  # the port now refuses connections
        snap = outlier_snap([dead_port, g1.port, g2.port])
        async with running_dataplane(snap) as p:
            for _ in range(60):
                if endpoint_view(p, dead_port)["ejected"]:
                    break
                await request(p.host, p.port, get())
            assert endpoint_view(p, dead_port)["ejected"] is True
            for _ in range(10):
                r = await request(p.host, p.port, get())
                assert r.status == 200


# --------------------------------------------------------------------------- stale keep-alive


def close_second_request_of_each_connection() -> Any:
    seen: dict[int, int] = {}

    def handler(rec: Recorded) -> Reply:
        seen[rec.conn_id] = seen.get(rec.conn_id, 0) + 1
        if seen[rec.conn_id] == 2:
            return Reply(silent_close=True)
        return Reply(body=b"fresh %d" % rec.conn_id)

    return handler


async def test_stale_keep_alive_get_replayed_once_post_is_503_uc() -> None:
    async with UpstreamServer(close_second_request_of_each_connection()) as up:
        snap = route_snapshot("svc", to_cluster("svc"), [cluster("svc", [up.port])])
        async with running_dataplane(snap, fast_settings()) as p:
            r = await request(p.host, p.port, get("/one"))
            assert (r.status, r.body) == (200, b"fresh 1")
            # the pooled connection is closed by the upstream as the GET arrives: replayed
            r = await request(p.host, p.port, get("/two"))
            assert (r.status, r.body) == (200, b"fresh 2")
            assert [(rec.target, rec.conn_id) for rec in up.requests] == [
                ("/one", 1),
                ("/two", 1),
                ("/two", 2),
            ]
            # the replay is transparent: same attempt, not a retry
            assert up.requests[2].header("x-envoy-attempt-count") == "1"
            assert p.metrics.count("retries") == 0
            assert p.metrics.requests[-1].flags == "-"
            # a POST on the next stale connection is not replayed (it may have been processed)
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(b"POST /pay HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc")
            r = await read_response(reader)
            writer.close()
            assert r.status == 503
            assert p.metrics.requests[-1].flags == "UC"
            assert [rec.target for rec in up.requests].count("/pay") == 1
            await wait_quiescent(p, "svc")


async def test_stale_replay_uses_a_new_connection_not_another_pooled_one() -> None:
    """Two pooled connections go stale together (an upstream restart): the replay must not
    take the other stale one from the pool, it opens a new connection."""
    handler = close_second_request_of_each_connection()

    def slow_first(rec: Recorded) -> Reply:
        reply = handler(rec)
        if rec.target.startswith("/warm"):
            reply.delay = 0.2  # both warm-up requests in flight together: two connections
        return reply

    async with UpstreamServer(slow_first) as up:
        snap = route_snapshot("svc", to_cluster("svc"), [cluster("svc", [up.port])])
        async with running_dataplane(snap, fast_settings()) as p:
            warm = await asyncio.gather(
                request(p.host, p.port, get("/warm1")), request(p.host, p.port, get("/warm2"))
            )
            assert [r.status for r in warm] == [200, 200] and up.connections == 2
            r = await request(p.host, p.port, get("/next"))
            assert (r.status, r.body) == (200, b"fresh 3")
            assert p.metrics.requests[-1].flags == "-"
            await wait_quiescent(p, "svc")
