"""Pool bookkeeping without sockets: cluster state per snapshot, endpoint carry-over, reuse rules,
and the upstream connection's response parsing driven with bytes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from meshproxy.config.model import (
    Cluster,
    ConnectionPool,
    Endpoint,
    LbKind,
    LoadBalancer,
    Snapshot,
)
from meshproxy.errors import Failure
from meshproxy.http.codec import ResponseHead
from meshproxy.settings import Settings
from meshproxy.upstream.connection import UpstreamConnection
from meshproxy.upstream.pool import EndpointState, Pools
from tests.support.fakes import FakeMetrics


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return None

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_response_head(self, status: int, head: ResponseHead) -> None:
        self.events.append(("head", status))

    def on_response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_response_complete(self, keep_alive: bool) -> None:
        self.events.append(("complete", keep_alive))

    def on_upstream_lost(self, failure: Failure) -> None:
        self.events.append(("lost", failure))

    def flush_response(self) -> None:
        self.events.append(("flush", None))

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass


def mk_cluster(ports: list[int], **kw: Any) -> Cluster:
    return Cluster(
        name="svc",
        host="svc",
        port=80,
        endpoints=tuple(Endpoint(address="10.0.0.1", port=p) for p in ports),
        **kw,
    )


def conn_for(ep: EndpointState) -> tuple[UpstreamConnection, FakeTransport]:
    c = UpstreamConnection(ep, 1024, 256)
    t = FakeTransport()
    c.connection_made(t)  # type: ignore[arg-type]
    return c, t


def test_cluster_state_built_once_and_rebuilt_on_change() -> None:
    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    c1 = mk_cluster([1, 2])
    cs1 = pools.cluster_state(c1)
    assert pools.cluster_state(c1) is cs1
    # an equal cluster object (new snapshot, same content) keeps the state
    c1b = mk_cluster([1, 2])
    assert pools.cluster_state(c1b) is cs1
    # a changed cluster gets a new state; surviving endpoints keep their EndpointState
    ep1 = cs1.endpoints[0]
    ep2 = cs1.endpoints[1]
    c2 = mk_cluster([1, 3])
    cs2 = pools.cluster_state(c2)
    assert cs2 is not cs1
    assert cs2.endpoints[0] is ep1
    assert cs2.endpoints[1] is not ep2 and ep2.removed


async def test_snapshot_swap_closes_idle_connections_of_removed_endpoints() -> None:
    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    c1 = mk_cluster([1, 2])
    cs = pools.cluster_state(c1)
    keep, gone = cs.endpoints
    a, ta = conn_for(keep)
    b, tb = conn_for(gone)
    for conn in (a, b):
        conn.bind(Sink(), False)  # type: ignore[arg-type]
        pools.release(conn, True, cs)
    assert keep.idle == [a] and gone.idle == [b]
    old = Snapshot(version="1", clusters={"svc": c1})
    new = Snapshot(version="2", clusters={"svc": mk_cluster([1])})
    pools.on_snapshot(old, new)
    assert tb.closed and not ta.closed
    assert pools.states()["svc"].endpoints == [keep]
    pools.on_snapshot(new, Snapshot(version="3"))
    assert ta.closed and "svc" not in pools.states()


async def test_release_rules() -> None:
    settings = Settings(max_idle_per_endpoint=1)
    pools = Pools(FakeMetrics(), settings)  # type: ignore[arg-type]
    cs = pools.cluster_state(mk_cluster([1], pool=ConnectionPool(max_requests_per_connection=2)))
    ep = cs.endpoints[0]
    a, ta = conn_for(ep)
    a.bind(Sink(), False)  # type: ignore[arg-type]
    pools.release(a, False, cs)  # not reusable (e.g. Connection: close): closed
    assert ta.closed and ep.idle == []

    b, tb = conn_for(ep)
    b.bind(Sink(), False)  # type: ignore[arg-type]
    pools.release(b, True, cs)
    assert ep.idle == [b]
    c, tc = conn_for(ep)
    c.bind(Sink(), False)  # type: ignore[arg-type]
    pools.release(c, True, cs)  # idle stack full
    assert tc.closed and ep.idle == [b]

    assert pools.take_idle(ep) is b
    b.bind(Sink(), False)  # type: ignore[arg-type]  # second request on b
    pools.release(b, True, cs)  # max_requests_per_connection reached
    assert tb.closed and ep.idle == []


async def test_take_idle_skips_closed_connections() -> None:
    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    cs = pools.cluster_state(mk_cluster([1]))
    ep = cs.endpoints[0]
    a, _ = conn_for(ep)
    b, _ = conn_for(ep)
    for conn in (a, b):
        conn.bind(Sink(), False)  # type: ignore[arg-type]
        pools.release(conn, True, cs)
    b.connection_lost(None)  # upstream closed the idle connection: forgotten at once
    assert ep.idle == [a]
    a.closed = True
    assert pools.take_idle(ep) is None


def test_picker_reads_live_active_counts() -> None:
    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    cs = pools.cluster_state(mk_cluster([1, 2], lb=LoadBalancer(kind=LbKind.LEAST_REQUEST)))
    cs.endpoints[0].active = 5
    picks = {cs.pick(r / 10).port for r in range(10)}  # type: ignore[union-attr]
    assert picks == {2}
    assert list(cs.active) == [5, 0]


def test_single_zero_weight_endpoint_is_not_picked() -> None:
    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    c = mk_cluster([1])
    c = replace(c, endpoints=(Endpoint(address="10.0.0.1", port=1, weight=0),))
    assert pools.cluster_state(c).pick(0.5) is None
    assert pools.cluster_state(mk_cluster([])).pick(0.5) is None


# --------------------------------------------------------------------------- response parsing


def test_connection_parses_response_and_reports_keep_alive() -> None:
    ep = EndpointState(Endpoint(address="10.0.0.1", port=1))
    conn, _ = conn_for(ep)
    sink = Sink()
    conn.bind(sink, False)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    conn.data_received(b"lo")
    assert sink.events == [
        ("head", 200),
        ("body", b"hel"),
        ("flush", None),
        ("body", b"lo"),
        ("complete", True),  # a completed response is flushed by the sink itself
    ]
    assert conn.sink is None


def test_connection_swallows_interim_responses() -> None:
    ep = EndpointState(Endpoint(address="10.0.0.1", port=1))
    conn, _ = conn_for(ep)
    sink = Sink()
    conn.bind(sink, False)  # type: ignore[arg-type]
    conn.data_received(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert [e for e in sink.events if e[0] != "flush"] == [("head", 201), ("complete", False)]


def test_head_response_ends_at_its_head_despite_content_length() -> None:
    ep = EndpointState(Endpoint(address="10.0.0.1", port=1))
    conn, _ = conn_for(ep)
    sink = Sink()
    conn.bind(sink, True)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert [e for e in sink.events if e[0] != "flush"] == [("head", 200), ("complete", True)]
    # the parser was replaced: the next response on the connection parses normally
    sink2 = Sink()
    conn.bind(sink2, False)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [e for e in sink2.events if e[0] != "flush"] == [("head", 204), ("complete", True)]


def test_garbage_from_upstream_is_a_protocol_error_and_reset() -> None:
    ep = EndpointState(Endpoint(address="10.0.0.1", port=1))
    conn, t = conn_for(ep)
    sink = Sink()
    conn.bind(sink, False)  # type: ignore[arg-type]
    conn.data_received(b"SSH-2.0-OpenSSH\r\n")
    assert sink.events == [("lost", Failure.UPSTREAM_PROTOCOL_ERROR)]
    assert t.aborted


def test_close_before_response_reports_reset() -> None:
    ep = EndpointState(Endpoint(address="10.0.0.1", port=1))
    conn, _ = conn_for(ep)
    sink = Sink()
    conn.bind(sink, False)  # type: ignore[arg-type]
    conn.connection_lost(None)
    assert sink.events == [("lost", Failure.UPSTREAM_RESET)]
    assert "closed" in repr(conn)


# --------------------------------------------------------------------------- circuit breakers


def test_can_connect_under_max_connections_and_an_endpoint_without_any_may_always() -> None:
    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    cs = pools.cluster_state(mk_cluster([1, 2], pool=ConnectionPool(max_connections=1)))
    a, b = cs.endpoints
    assert cs.can_connect(a)
    pools.reserve(cs, a)
    assert cs.counters.cx_active == 1 and a.conns == 1
    assert not cs.can_connect(a)  # the cluster is at its limit
    assert cs.can_connect(b)  # Envoy: a host with no connection may open one (no deadlock)
    a.connection_closed()
    assert cs.counters.cx_active == 0 and cs.can_connect(a)
    unlimited = pools.cluster_state(replace(mk_cluster([1]), name="u"))
    ep = unlimited.endpoints[0]
    for _ in range(5):
        pools.reserve(unlimited, ep)
    assert unlimited.can_connect(ep)


async def test_released_connection_goes_to_the_first_waiter_of_its_endpoint() -> None:
    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    cs = pools.cluster_state(mk_cluster([1], pool=ConnectionPool(max_connections=1)))
    ep = cs.endpoints[0]
    got: list[object] = []
    for name in ("first", "second"):
        ep.waiters.append(lambda up, name=name: got.append((name, up)))
        cs.counters.rq_pending += 1
    conn, t = conn_for(ep)
    conn.bind(Sink(), False)  # type: ignore[arg-type]
    pools.release(conn, True, cs)
    assert got == [("first", conn)] and ep.idle == [] and not t.closed
    assert cs.counters.rq_pending == 1
    # a connection that is not reusable is closed, not handed over
    conn2, t2 = conn_for(ep)
    conn2.bind(Sink(), False)  # type: ignore[arg-type]
    pools.release(conn2, False, cs)
    assert t2.closed and len(got) == 1


def test_a_closed_connection_lets_one_waiter_connect() -> None:
    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    cs = pools.cluster_state(mk_cluster([1], pool=ConnectionPool(max_connections=1)))
    ep = cs.endpoints[0]
    pools.reserve(cs, ep)
    got: list[object] = []
    ep.waiters.extend([got.append, got.append])
    cs.counters.rq_pending += 2
    ep.connection_closed()
    assert got == [None]  # may connect now
    assert cs.counters.cx_active == 0 and cs.counters.rq_pending == 1
    ep.fail_waiters()  # the endpoint left the cluster: every waiter decides on its own
    assert got == [None, None] and cs.counters.rq_pending == 0


def test_pick_skips_ejected_and_already_tried_endpoints() -> None:
    from meshproxy.config.model import OutlierPolicy

    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    cs = pools.cluster_state(
        mk_cluster(
            [1, 2, 3],
            lb=LoadBalancer(kind=LbKind.ROUND_ROBIN),
            outlier=OutlierPolicy(consecutive_5xx=1, max_ejection_percent=100),
        )
    )
    a, b, c = cs.endpoints
    assert cs.detector is not None
    ej = cs.detector.on_status(a.index, 503, 0.0)
    assert ej is not None and a.ejected
    picks = {cs.pick(0.5) for _ in range(30)}
    assert picks == {b, c}
    # a retry avoids the endpoints it tried while another one is available...
    assert {cs.pick(0.5, avoid=[b]) for _ in range(10)} == {c}
    # ...and falls back to a normal pick when every available one was tried
    assert {cs.pick(0.5, avoid=[b, c]) for _ in range(10)} <= {b, c}
    # removing outlier detection from the cluster forgets the ejection
    cs2 = pools.cluster_state(mk_cluster([1, 2, 3], lb=LoadBalancer(kind=LbKind.ROUND_ROBIN)))
    assert cs2.endpoints[0] is a and not a.ejected and cs2.detector is None


async def test_outlier_sweeps_keep_their_rhythm_across_frequent_redefinitions() -> None:
    """A cluster redefined more often than its `interval` (endpoint churn) still sweeps: the
    next sweep's time is carried over, so an ejected endpoint returns."""
    import asyncio

    from meshproxy.config.model import OutlierPolicy

    pools = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    policy = OutlierPolicy(
        consecutive_5xx=1, interval=0.2, base_ejection_time=0.1, max_ejection_percent=100
    )
    cs = pools.cluster_state(mk_cluster([1, 2], outlier=policy))
    bad = cs.endpoints[0]
    assert cs.detector is not None
    assert cs.detector.on_status(bad.index, 503, asyncio.get_running_loop().time()) is not None
    assert bad.ejected
    for i in range(8):  # a new definition every 0.1 s for 0.8 s (a new port each time)
        await asyncio.sleep(0.1)
        cs = pools.cluster_state(mk_cluster([1, 2, 100 + i], outlier=policy))
    assert not bad.ejected
    pools.close()
