"""Retry budgets and connection-pool circuit breaking through the real data path.

Concurrency limits are asserted exactly: the cluster's counters are replaced by
:class:`~tests.support.resilience.MaxCounters`, which remember the highest value each count
reached, so "never more than N concurrent retries" does not depend on sampling luck. The
upstreams answer after a delay so that all requests of a wave are in flight together."""

from __future__ import annotations

import asyncio

from meshproxy.config.model import ConnectionPool, RetryBudget, RetryPolicy
from tests.support.dataplane import RunningPlane, running_dataplane
from tests.support.fakes import cluster, to_cluster
from tests.support.rawhttp import Response, get, request
from tests.support.resilience import (
    fast_settings,
    route_snapshot,
    track_counters,
    wait_quiescent,
)
from tests.support.upstream import Reply, UpstreamServer

FIVE_XX = RetryPolicy(attempts=3, retry_on=frozenset({"5xx"}))


def snap_for(ports: list[int], retries: RetryPolicy = FIVE_XX, **ckw: object):  # type: ignore[no-untyped-def]
    return route_snapshot("svc", to_cluster("svc", retries=retries), [cluster("svc", ports, **ckw)])


async def wave(p: RunningPlane, n: int, timeout: float = 10.0) -> list[Response]:
    return list(
        await asyncio.gather(
            *(request(p.host, p.port, get(f"/{i}"), timeout=timeout) for i in range(n))
        )
    )


# --------------------------------------------------------------------------- retry budget


async def test_cluster_retry_budget_bounds_concurrent_retries() -> None:
    async with (
        UpstreamServer(Reply(503, delay=0.15)) as a,
        UpstreamServer(Reply(503, delay=0.15)) as b,
    ):
        snap = snap_for([a.port, b.port], retry_budget=RetryBudget(percent=0, min_concurrency=1))
        async with running_dataplane(snap, fast_settings()) as p:
            mc = track_counters(p, "svc")
            rs = await wave(p, 10)
            assert all(r.status == 503 for r in rs)
            assert mc.peak["retries_active"] == 1
            assert p.metrics.count("retry_overflows") >= 5
            flags = [m.flags.split(",") for m in p.metrics.requests]
            assert sum("UO" in f for f in flags) == p.metrics.count("retry_overflows")
            # the upstreams saw only what the budget let through
            total = len(a.requests) + len(b.requests)
            assert total == 10 + p.metrics.count("retries")
            await wait_quiescent(p, "svc")


async def test_max_retries_bounds_concurrent_retries_without_budget() -> None:
    async with UpstreamServer(Reply(503, delay=0.15)) as up:
        snap = snap_for([up.port], pool=ConnectionPool(max_retries=2))
        settings = fast_settings(retry_budget_percent=None)
        async with running_dataplane(snap, settings) as p:
            mc = track_counters(p, "svc")
            rs = await wave(p, 10)
            assert all(r.status == 503 for r in rs)
            assert mc.peak["retries_active"] == 2
            assert p.metrics.count("retry_overflows") >= 5
            assert any("UO" in m.flags.split(",") for m in p.metrics.requests)
            await wait_quiescent(p, "svc")


async def test_default_budget_bites_and_none_disables_it() -> None:
    async with UpstreamServer(Reply(503, delay=0.15)) as up:
        # our default: 20 % of active + pending, at least 3 concurrent retries
        async with running_dataplane(snap_for([up.port]), fast_settings()) as p:
            mc = track_counters(p, "svc")
            await wave(p, 12)
            assert mc.peak["retries_active"] == 3
            assert p.metrics.count("retry_overflows") > 0
            await wait_quiescent(p, "svc")
        # Istio's behaviour (no budget at all): every request gets its 3 retries
        up.requests.clear()
        settings = fast_settings(retry_budget_percent=None)
        async with running_dataplane(snap_for([up.port]), settings) as p:
            mc = track_counters(p, "svc")
            rs = await wave(p, 12)
            assert all(r.status == 503 for r in rs)
            assert p.metrics.count("retry_overflows") == 0
            assert p.metrics.count("retries") == 36
            assert len(up.requests) == 48
            assert mc.peak["retries_active"] > 3
            assert {m.flags for m in p.metrics.requests} == {"URX"}
            await wait_quiescent(p, "svc")


async def test_budget_percent_scales_with_outstanding_requests() -> None:
    """percent=50 of 10 outstanding requests = 5 concurrent retries (min 1)."""
    async with UpstreamServer(Reply(503, delay=0.2)) as up:
        snap = snap_for([up.port], retry_budget=RetryBudget(percent=50, min_concurrency=1))
        async with running_dataplane(snap, fast_settings()) as p:
            mc = track_counters(p, "svc")
            await wave(p, 10)
            assert 1 < mc.peak["retries_active"] <= 5
            await wait_quiescent(p, "svc")


# --------------------------------------------------------------------------- circuit breaking


async def test_max_connections_1_second_request_waits_for_the_released_connection() -> None:
    async with UpstreamServer(Reply(body=b"slow", delay=0.2)) as up:
        snap = snap_for([up.port], pool=ConnectionPool(max_connections=1))
        async with running_dataplane(snap, fast_settings()) as p:
            mc = track_counters(p, "svc")
            rs = await wave(p, 2)
            assert [(r.status, r.body) for r in rs] == [(200, b"slow")] * 2
            assert up.connections == 1
            assert {rec.conn_id for rec in up.requests} == {1}
            assert mc.peak["cx_active"] == 1
            await wait_quiescent(p, "svc")


async def test_max_connections_many_concurrent_never_opens_more() -> None:
    async with UpstreamServer(Reply(body=b"x", delay=0.05)) as up:
        snap = snap_for([up.port], pool=ConnectionPool(max_connections=2))
        async with running_dataplane(snap, fast_settings()) as p:
            mc = track_counters(p, "svc")
            rs = await wave(p, 8)
            assert all(r.status == 200 for r in rs)
            assert up.connections <= 2
            assert mc.peak["cx_active"] <= 2
            await wait_quiescent(p, "svc")


async def test_pending_overflow_is_503_uo_overloaded_at_once() -> None:
    async with UpstreamServer(Reply(body=b"slow", delay=0.6)) as up:
        pool = ConnectionPool(max_connections=1, max_pending_requests=1)
        async with running_dataplane(snap_for([up.port], pool=pool), fast_settings()) as p:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            done: list[tuple[float, Response]] = []

            async def one(i: int) -> None:
                r = await request(p.host, p.port, get(f"/{i}"), timeout=5)
                done.append((loop.time() - t0, r))

            await asyncio.gather(*(one(i) for i in range(3)))
            overflowed = [(t, r) for t, r in done if r.status == 503]
            assert len(overflowed) == 1
            t, r = overflowed[0]
            assert r.header("x-envoy-overloaded") == "true"
            assert t < 0.4  # at once, not after the slow upstream answered
            assert sorted(r.status for _, r in done) == [200, 200, 503]
            assert [m.flags for m in p.metrics.requests].count("UO") == 1
            assert p.metrics.count("overflows") == 1
            assert up.connections == 1 and len(up.requests) == 2
            await wait_quiescent(p, "svc")


async def test_max_requests_overflow_is_503_uo() -> None:
    async with UpstreamServer(Reply(body=b"slow", delay=0.4)) as up:
        pool = ConnectionPool(max_requests=1)
        async with running_dataplane(snap_for([up.port], pool=pool), fast_settings()) as p:
            rs = await wave(p, 2)
            assert sorted(r.status for r in rs) == [200, 503]
            over = next(r for r in rs if r.status == 503)
            assert over.header("x-envoy-overloaded") == "true"
            assert b"overflow" in over.body
            assert len(up.requests) == 1
            assert "UO" in [m.flags for m in p.metrics.requests]
            await wait_quiescent(p, "svc")


async def test_pending_request_waits_at_most_the_connect_timeout() -> None:
    async with UpstreamServer(Reply(body=b"slow", delay=2.0)) as up:
        pool = ConnectionPool(max_connections=1, connect_timeout=0.3)
        async with running_dataplane(snap_for([up.port], pool=pool), fast_settings()) as p:
            loop = asyncio.get_running_loop()
            first = asyncio.ensure_future(request(p.host, p.port, get("/1"), timeout=5))
            await asyncio.sleep(0.1)
            t0 = loop.time()
            r = await request(p.host, p.port, get("/2"), timeout=5)
            elapsed = loop.time() - t0
            assert r.status == 503 and r.header("x-envoy-overloaded") == "true"
            assert 0.2 <= elapsed < 1.5
            assert (await first).status == 200
            assert len(up.requests) == 1
            await wait_quiescent(p, "svc")


async def test_counters_back_to_zero_after_mixed_failures() -> None:
    """Overflows, retries, timeouts and successes together leave no count behind."""
    n = 0

    def handler(rec: object) -> Reply:
        nonlocal n
        n += 1
        if n % 3 == 0:
            return Reply(reset=True)
        if n % 3 == 1:
            return Reply(503, delay=0.05)
        return Reply(200, delay=0.05)

    async with UpstreamServer(handler) as up:
        pool = ConnectionPool(max_connections=2, max_pending_requests=4, connect_timeout=0.5)
        retries = RetryPolicy(attempts=2, retry_on=frozenset({"5xx", "reset"}))
        snap = snap_for([up.port], retries=retries, pool=pool)
        async with running_dataplane(snap, fast_settings()) as p:
            mc = track_counters(p, "svc")
            rs = await wave(p, 20)
            assert {r.status for r in rs} <= {200, 503}
            assert mc.peak["cx_active"] <= 2
            await wait_quiescent(p, "svc")
            assert mc.cx_active == up.open_connections


async def test_route_timeout_while_pending_frees_the_pending_slot() -> None:
    async with UpstreamServer(Reply(body=b"slow", delay=0.8)) as up:
        pool = ConnectionPool(max_connections=1, max_pending_requests=1, connect_timeout=5.0)
        snap = route_snapshot(
            "svc",
            to_cluster("svc", retries=FIVE_XX, timeout=0.3),
            [cluster("svc", [up.port], pool=pool)],
        )
        async with running_dataplane(snap, fast_settings()) as p:
            mc = track_counters(p, "svc")
            first = asyncio.ensure_future(request(p.host, p.port, get("/1"), timeout=5))
            await asyncio.sleep(0.1)
            r = await request(p.host, p.port, get("/2"), timeout=5)
            assert r.status == 504  # the route timeout ended the wait, not the overflow
            assert mc.rq_pending == 0 and mc.peak["rq_pending"] == 1
            # the freed pending slot is usable again at once
            r3 = asyncio.ensure_future(request(p.host, p.port, get("/3"), timeout=5))
            assert (await first).status == 504
            assert (await r3).status in (200, 504)
            await wait_quiescent(p, "svc")


async def test_failed_connect_wakes_the_requests_waiting_for_its_slot() -> None:
    """maxConnections=1 on a dead endpoint: the waiting request does not sit out its
    connect-timeout deadline; it is woken when the connect fails and fails (or retries) too."""
    from tests.support.resilience import closed_port

    pool = ConnectionPool(max_connections=1, connect_timeout=3.0)
    no_retries = RetryPolicy(attempts=0)
    async with running_dataplane(
        snap_for([closed_port()], retries=no_retries, pool=pool), fast_settings()
    ) as p:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rs = await wave(p, 4)
        assert [r.status for r in rs] == [503] * 4
        assert loop.time() - t0 < 1.5
        assert {m.flags for m in p.metrics.requests} == {"UF"}
        await wait_quiescent(p, "svc")


async def test_refused_retry_sends_the_held_upstream_response() -> None:
    """A retriable response is held through the backoff; when the budget then refuses the
    retry, the client gets that upstream response itself (status, headers, body), flagged UO,
    and its keep-alive connection goes back to the pool (not reset)."""
    body = b"upstream says no" * 100
    reply = Reply(503, headers=[("x-from", "upstream")], body=body, delay=0.15)
    async with UpstreamServer(reply) as up:
        snap = snap_for([up.port], retry_budget=RetryBudget(percent=0, min_concurrency=1))
        async with running_dataplane(snap, fast_settings()) as p:
            rs = await wave(p, 6)
            assert all(r.status == 503 for r in rs)
            assert all(r.body == body and r.header("x-from") == "upstream" for r in rs)
            refused = [m for m in p.metrics.requests if "UO" in m.flags.split(",")]
            assert len(refused) == p.metrics.count("retry_overflows") >= 3
            await wait_quiescent(p, "svc")
            (view,) = [c for c in p.dp.clusters_view()["clusters"] if c["name"] == "svc"]
            cb = view["circuit_breakers"]
            assert cb["retries_peak"] == 1  # the budget's minimum, never more
            assert cb["retries_active"] == cb["rq_active"] == cb["rq_routed"] == 0
            # every connection that carried a complete keep-alive 503 was reusable
            assert up.connections <= 6 + p.metrics.count("retries")
