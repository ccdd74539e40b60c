"""Admin: generic config serialisation (pure) and the HTTP endpoints on a real socket."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
from typing import Any

import aiohttp
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.admin import (
    Admin,
    DumpQuery,
    Section,
    materialize,
    snapshot_dump,
    to_jsonable,
)
from meshproxy.config.model import (
    Cluster,
    DirectResponse,
    Endpoint,
    LbKind,
    LoadBalancer,
    Match,
    MatchKind,
    Meta,
    Mirror,
    RetryPolicy,
    Route,
    RouteTable,
    Snapshot,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)
from meshproxy.metrics import Export, Metrics

VS = Meta(kind="VirtualService", name="reviews", file="mesh/vs.yaml", path="spec.http[0]")
SE = Meta(kind="ServiceEntry", name="reviews")
DR = Meta(kind="DestinationRule", name="reviews")
HOST = "reviews.default.svc.cluster.local"


def sample_snapshot() -> Snapshot:
    route = Route(
        name="jason",
        meta=VS,
        matches=(
            Match(
                headers=(("end-user", StringMatch(MatchKind.EXACT, "jason")),),
                uri=StringMatch(MatchKind.REGEX, "/r.*", regex=re.compile("/r.*")),
            ),
        ),
        clusters=(
            WeightedCluster(cluster=f"{HOST}|v1", weight=90, host=HOST, subset="v1"),
            WeightedCluster(cluster=f"{HOST}|v2", weight=10, host=HOST, subset="v2"),
        ),
        total_weight=100,
    )
    vh = VirtualHost(name=HOST, meta=VS, domains=(HOST,), routes=(route,))
    cluster = Cluster(
        name=f"{HOST}|v1",
        host=HOST,
        port=9080,
        subset="v1",
        endpoints=(Endpoint("127.0.0.1", 9081, labels={"version": "v1"}, meta=SE),),
        lb=LoadBalancer(LbKind.ROUND_ROBIN),
        meta=SE,
        policy_meta=DR,
    )
    return Snapshot(
        version="abc",
        routes=RouteTable(exact={HOST: vh, "reviews": vh}),
        clusters={cluster.name: cluster},
    )


def test_to_jsonable_is_compact_and_keeps_what_is_set() -> None:
    d = to_jsonable(sample_snapshot())
    json.dumps(d)  # fully serialisable
    vh = d["routes"]["exact"]["reviews"]
    route = vh["routes"][0]
    assert route["meta"] == VS.as_dict()
    # a regex match: the pattern once (``regex`` is just ``value`` compiled), no defaults
    assert route["matches"][0]["uri"] == {"kind": "regex", "value": "/r.*"}
    assert route["matches"][0]["headers"] == [["end-user", {"kind": "exact", "value": "jason"}]]
    assert set(route["matches"][0]) == {"uri", "headers"}
    # the default retry policy, headers, mirrors, ... are left out; set fields stay
    assert set(route) == {"name", "meta", "matches", "clusters", "total_weight"}
    assert route["clusters"][0] == {
        "cluster": f"{HOST}|v1",
        "weight": 90,
        "host": HOST,
        "subset": "v1",
    }
    (cluster,) = d["clusters"].values()
    assert cluster["lb"] == {"kind": "ROUND_ROBIN"} and "pool" not in cluster
    assert "outlier" not in cluster and "tls" not in cluster
    assert to_jsonable(b"hi") == "hi"
    assert to_jsonable(frozenset({"b", "a"})) == ["a", "b"]


def test_to_jsonable_writes_values_that_differ_from_the_default() -> None:
    # retries=None (no retries) is not the default (Istio's 2 attempts): it must show
    route = Route(name="r", meta=VS, retries=None)
    assert to_jsonable(route) == {"name": "r", "meta": VS.as_dict(), "retries": None}
    custom = RetryPolicy(attempts=5, retry_on=frozenset({"5xx"}))
    assert to_jsonable(Route(name="r", meta=VS, retries=custom))["retries"] == {
        "attempts": 5,
        "retry_on": ["5xx"],
    }
    # a cluster's provenance is always shown, null when it has none
    assert to_jsonable(Cluster(name="c", host="c", port=80)) == {
        "name": "c",
        "host": "c",
        "port": 80,
        "meta": None,
    }
    sm = StringMatch(MatchKind.REGEX, "a+", ignore_case=True, regex=re.compile("A+", re.I))
    assert to_jsonable(sm) == {"kind": "regex", "value": "a+", "ignore_case": True, "regex": "A+"}


def test_to_jsonable_memo_shares_conversions_of_shared_objects() -> None:
    snap = sample_snapshot()
    memo: dict[int, Any] = {}
    vh = snap.routes.exact["reviews"]
    a = to_jsonable(vh.routes[0], memo)
    b = to_jsonable(vh.routes[0], memo)
    assert a == b and a is not b  # routes are one per route: never memoized
    assert a["matches"][0] is b["matches"][0]  # the Match object below them is


def test_snapshot_dump_shape() -> None:
    dump = materialize(
        snapshot_dump(
            sample_snapshot(),
            last_error="f.yaml: VirtualService/x: spec: bad",
            listeners=[{"name": "outbound", "address": "127.0.0.1:1"}],
        )
    )
    assert dump["version"] == "abc"
    assert dump["last_error"].startswith("f.yaml")
    assert dump["listeners"][0]["name"] == "outbound"
    (vh,) = dump["virtual_hosts"]  # two aliases, one virtual host
    assert vh["aliases"] == ["reviews", HOST]
    assert vh["meta"]["kind"] == "VirtualService"
    route = vh["routes"][0]
    assert route["meta"] == VS.as_dict()
    assert [c["weight"] for c in route["clusters"]] == [90, 10]
    assert route["matches"][0]["headers"] == [["end-user", {"kind": "exact", "value": "jason"}]]
    (cluster,) = dump["clusters"]
    assert cluster["meta"]["kind"] == "ServiceEntry"
    assert cluster["policy_meta"]["kind"] == "DestinationRule"
    assert cluster["lb"]["kind"] == "ROUND_ROBIN"
    assert cluster["endpoints"][0]["labels"] == {"version": "v1"}
    assert cluster["endpoints"][0]["meta"] == SE.as_dict()


def test_snapshot_dump_is_lazy_and_cheap() -> None:
    # building the document costs nothing per route: the big sections are produced when
    # the answer is written
    dump = snapshot_dump(big_snapshot(2000))
    assert isinstance(dump["virtual_hosts"], Section)
    assert isinstance(dump["clusters"], Section)


def test_dump_query_parse() -> None:
    assert DumpQuery.parse({}) == DumpQuery()
    q = DumpQuery.parse({"resource": "routes,clusters", "host": "Reviews:9080"})
    assert q.sections == {"virtual_hosts", "clusters"} and q.host == "reviews"
    assert DumpQuery.parse({"resource": "version"}).sections == frozenset()
    assert DumpQuery.parse({"version_only": "1"}).sections == frozenset()
    assert DumpQuery.parse({"version_only": "0"}).sections is None
    assert DumpQuery.parse({"host": "[::1]:80"}).host == "[::1]"
    for bad, text in (
        ({"resource": "secrets"}, "unknown resource 'secrets'"),
        ({"name_regex": "("}, "name_regex"),
        ({"mask": "x"}, "unknown query parameter"),
        ({"host": " "}, "host"),
    ):
        with pytest.raises(ValueError, match=re.escape(text)):
            DumpQuery.parse(bad)


def big_snapshot(hosts: int, routes_per_host: int = 5) -> Snapshot:
    """A generated table shaped like benchmarks/bigtable.py's: one VirtualService per host,
    ``routes_per_host`` prefix rules sharing their match and destination objects (as the
    translation shares equal sub-structures), one cluster per host, one shared upstream."""
    se = Meta(kind="ServiceEntry", name="svc-block", file="services.yaml", path="spec.hosts[0]")
    up = "upstream.bench.local"
    dest = (WeightedCluster(cluster=up, weight=100, host=up, port=80),)
    matches = [
        (Match(uri=StringMatch(MatchKind.PREFIX, f"/api/v{k}/")),) for k in range(routes_per_host)
    ]
    exact: dict[str, VirtualHost] = {}
    clusters: dict[str, Cluster] = {}
    ep = Endpoint("127.0.0.1", 8080, meta=se)
    for i in range(hosts):
        h = f"svc-{i}.bench.local"
        vs = Meta(kind="VirtualService", name=f"svc-{i}", file="routes.yaml")
        routes = tuple(
            Route(
                name=f"r{k}",
                meta=dataclasses.replace(vs, path=f"spec.http[{k}]"),
                matches=matches[k],
                clusters=dest,
                total_weight=100,
            )
            for k in range(routes_per_host)
        )
        exact[h] = VirtualHost(name=f"default/svc-{i}", meta=vs, domains=(h,), routes=routes)
        clusters[h] = Cluster(name=h, host=h, port=80, endpoints=(ep,), meta=se)
    clusters[up] = Cluster(name=up, host=up, port=80, endpoints=(ep,), meta=se)
    return Snapshot(version="big", routes=RouteTable(exact=exact), clusters=clusters)


class FakeBackend:
    def __init__(self) -> None:
        self.ready = False
        self.drained = 0
        self.quit = asyncio.Event()
        self.metrics = Metrics()

    async def is_ready(self) -> bool:
        return self.ready

    async def config_dump(self, query: Any = None) -> dict[str, Any]:
        return snapshot_dump(sample_snapshot())

    async def clusters(self) -> dict[str, Any]:
        return {"clusters": [{"name": "c", "endpoints": []}]}

    async def stats_export(self) -> Export:
        return self.metrics.export()

    async def drain(self) -> None:
        self.drained += 1
        self.ready = False

    def request_quit(self) -> None:
        self.quit.set()


@pytest.fixture
async def admin():
    backend = FakeBackend()
    adm = Admin(backend)
    host, port = await adm.start("127.0.0.1", 0)
    assert port != 0
    async with aiohttp.ClientSession(base_url=f"http://{host}:{port}") as session:
        yield backend, session
    await adm.close()


async def test_ready_and_drain(admin) -> None:
    backend, s = admin
    async with s.get("/ready") as r:
        assert r.status == 503
    backend.ready = True
    async with s.get("/ready") as r:
        assert r.status == 200
    async with s.post("/drain") as r:
        assert r.status == 200
    assert backend.drained == 1
    async with s.get("/ready") as r:
        assert r.status == 503


async def test_config_dump_and_clusters(admin) -> None:
    _, s = admin
    async with s.get("/config_dump") as r:
        assert r.status == 200 and r.content_type == "application/json"
        dump = await r.json()
    assert dump["version"] == "abc"
    assert dump["virtual_hosts"][0]["routes"][0]["meta"]["name"] == "reviews"
    async with s.get("/clusters") as r:
        assert (await r.json())["clusters"][0]["name"] == "c"


async def test_prometheus_and_stats(admin) -> None:
    backend, s = admin
    backend.metrics.record_request(None, 404, "NR", 0.001, 0, 0)
    async with s.get("/stats/prometheus") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = [x for x in fams["istio_requests"].samples if x.name == "istio_requests_total"]
    assert sample.labels["response_flags"] == "NR"
    async with s.get("/stats") as r:
        text = await r.text()
    assert "istio_requests_total{" in text and "# TYPE" not in text
    async with s.get("/stats?format=json") as r:
        raw = await r.json()
    assert raw["requests"][0][1] == 404


async def test_quitquitquit_answers_then_quits(admin) -> None:
    backend, s = admin
    async with s.post("/quitquitquit") as r:
        assert r.status == 200
    await asyncio.wait_for(backend.quit.wait(), 1.0)


async def test_get_on_post_endpoint_is_405(admin) -> None:
    _, s = admin
    async with s.get("/quitquitquit") as r:
        assert r.status == 405


async def test_bind_conflict_raises_oserror() -> None:
    a = Admin(FakeBackend())
    _, port = await a.start("127.0.0.1", 0)
    b = Admin(FakeBackend())
    try:
        with pytest.raises(OSError):
            await b.start("127.0.0.1", port)
    finally:
        await a.close()
        await b.close()


async def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(timeout):
            return await reader.read()  # every admin answer closes the connection
    finally:
        writer.close()


async def test_head_unknown_path_bad_request_and_allow_header() -> None:
    adm = Admin(FakeBackend())
    _, port = await adm.start("127.0.0.1", 0)
    try:
        raw = await _raw(port, b"HEAD /ready HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 503 ") and raw.endswith(b"\r\n\r\n")  # no body
        assert b"Content-Length: 10\r\n" in raw and b"Connection: close\r\n" in raw
        raw = await _raw(port, b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 404 ")
        raw = await _raw(port, b"DELETE /drain HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 405 ") and b"Allow: POST\r\n" in raw
        raw = await _raw(port, b"GARBAGE\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ")
        raw = await _raw(port, b"GET /stats?format=json HTTP/1.0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["requests"] == []
    finally:
        await adm.close()


async def test_incomplete_request_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshproxy.admin as admin_mod

    monkeypatch.setattr(admin_mod, "ADMIN_HEAD_TIMEOUT", 0.2)
    adm = Admin(FakeBackend())
    _, port = await adm.start("127.0.0.1", 0)
    try:
        raw = await _raw(port, b"GET /ready HTTP/1.1\r\nHost: a\r\n", timeout=3)
        assert raw.startswith(b"HTTP/1.1 408 ")
    finally:
        await adm.close()


async def test_handler_bug_is_500_not_a_dead_connection() -> None:
    class Broken(FakeBackend):
        async def clusters(self) -> dict[str, Any]:
            raise RuntimeError("bug")

    adm = Admin(Broken())
    _, port = await adm.start("127.0.0.1", 0)
    try:
        raw = await _raw(port, b"GET /clusters HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 500 ")
    finally:
        await adm.close()


async def test_fetch_client_against_admin() -> None:
    from meshproxy.admin import FetchError, fetch

    backend = FakeBackend()
    adm = Admin(backend)
    host, port = await adm.start("127.0.0.1", 0)
    try:
        status, ctype, body = await fetch(host, port, "GET", "/clusters", 5)
        assert status == 200 and ctype == "application/json"
        assert json.loads(body)["clusters"][0]["name"] == "c"
        status, ctype, body = await fetch(host, port, "POST", "/drain", 5)
        assert (status, body) == (200, b"OK\n") and backend.drained == 1
    finally:
        await adm.close()
    with pytest.raises(FetchError):
        await fetch(host, port, "GET", "/ready", 2)  # nothing listens any more


# --------------------------------------------------------------------------- filters


def filter_snapshot() -> Snapshot:
    """Two services, a wildcard and a catch-all, for the ``/config_dump`` filters."""
    base = sample_snapshot()
    ratings = "ratings.default.svc.cluster.local"
    rmeta = Meta(kind="VirtualService", name="ratings")
    rroute = Route(
        name="all",
        meta=rmeta,
        clusters=(WeightedCluster(cluster=ratings, weight=100, host=ratings),),
        total_weight=100,
        mirrors=(Mirror(cluster=f"{HOST}|v1", host=HOST, subset="v1"),),
    )
    rvh = VirtualHost(name="default/ratings", meta=rmeta, domains=(ratings,), routes=(rroute,))
    wmeta = Meta(kind="VirtualService", name="wild")
    ext = "api.example.com"
    wvh = VirtualHost(
        name="default/wild",
        meta=wmeta,
        domains=("*.example.com",),
        routes=(
            Route(
                name="w",
                meta=wmeta,
                clusters=(WeightedCluster(cluster=ext, weight=1, host=ext),),
                total_weight=1,
            ),
        ),
    )
    cmeta = Meta(kind="VirtualService", name="catch")
    cvh = VirtualHost(
        name="default/catch",
        meta=cmeta,
        domains=("*",),
        routes=(Route(name="c", meta=cmeta, direct_response=DirectResponse(418, b"tea")),),
    )
    exact = dict(base.routes.exact)
    exact.update({ratings: rvh, "ratings": rvh})
    clusters = dict(base.clusters)
    for name, host in ((ratings, ratings), (ext, ext), ("orphan", "orphan.example.org")):
        clusters[name] = Cluster(name=name, host=host, port=80, meta=SE)
    return Snapshot(
        version="v7",
        routes=RouteTable(exact=exact, wildcards={".example.com": wvh}, catch_all=cvh),
        clusters=clusters,
    )


def _names(dump: dict[str, Any], key: str) -> list[str]:
    return [e["name"] for e in dump[key]]


@pytest.mark.parametrize("plain", [False, True], ids=["snapshot", "plain-json"])
def test_dump_filters(plain: bool) -> None:
    doc: dict[str, Any] = snapshot_dump(
        filter_snapshot(), listeners=[{"name": "outbound", "address": "127.0.0.1:1"}]
    )
    if plain:  # what the --workers supervisor holds: a worker's dump, parsed
        doc = materialize(doc)

    def q(**query: str) -> dict[str, Any]:
        return materialize(doc, DumpQuery.parse(query))

    full = q()
    assert _names(full, "virtual_hosts") == [
        "default/catch",
        "default/ratings",
        "default/wild",
        HOST,  # sample_snapshot's virtual host is named by its host
    ]
    assert _names(full, "clusters") == sorted(filter_snapshot().clusters)
    assert full["virtual_hosts"][2]["aliases"] == ["*.example.com"]
    assert full["virtual_hosts"][0]["aliases"] == ["*"]
    assert full["virtual_hosts"][0]["routes"][0]["direct_response"] == {
        "status": 418,
        "body": "tea",
    }

    assert q(resource="version") == {"version": "v7", "last_error": None}
    assert q(version_only="1") == {"version": "v7", "last_error": None}
    only = q(resource="clusters")
    assert set(only) == {"version", "last_error", "clusters"}
    assert only["clusters"] == full["clusters"]
    assert set(q(resource="routes,listeners")) == {
        "version",
        "last_error",
        "virtual_hosts",
        "listeners",
    }

    # name_regex: re.search on a virtual host's name, domains and aliases; a cluster's name
    assert _names(q(name_regex="^ratings$"), "virtual_hosts") == ["default/ratings"]
    assert _names(q(name_regex="example"), "virtual_hosts") == ["default/wild"]
    assert _names(q(name_regex=r"\|v1$", resource="clusters"), "clusters") == [f"{HOST}|v1"]
    assert _names(q(name_regex="nomatch"), "listeners") == []

    # host: the virtual host that request host reaches, as the data plane looks it up,
    # and the clusters its routes send or mirror to
    got = q(host="ratings:9080")
    assert _names(got, "virtual_hosts") == ["default/ratings"]
    assert _names(got, "clusters") == sorted(["ratings.default.svc.cluster.local", f"{HOST}|v1"])
    assert got["listeners"] == full["listeners"]  # host does not narrow listeners
    assert _names(q(host="REVIEWS"), "virtual_hosts") == [HOST]
    got = q(host="api.example.com")
    assert _names(got, "virtual_hosts") == ["default/wild"]
    assert _names(got, "clusters") == ["api.example.com"]
    got = q(host="orphan.example.org")  # no virtual host of its own: the catch-all
    assert _names(got, "virtual_hosts") == ["default/catch"]
    assert _names(got, "clusters") == ["orphan"]  # by its service host


def test_host_filter_without_any_route() -> None:
    snap = sample_snapshot()
    doc = snapshot_dump(snap)
    for d in (doc, materialize(doc)):
        got = materialize(d, DumpQuery.parse({"host": "nosuch"}))
        assert got["virtual_hosts"] == [] and got["clusters"] == []


# --------------------------------------------------------------------------- HTTP


async def test_config_dump_filters_over_http(admin) -> None:
    _, s = admin
    async with s.get("/config_dump?resource=version") as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert r.headers["Content-Length"]  # small answers keep a Content-Length
        assert await r.json() == {"version": "abc", "last_error": None}
    async with s.get("/config_dump", params={"resource": "clusters", "name_regex": "v1"}) as r:
        assert [c["name"] for c in (await r.json())["clusters"]] == [f"{HOST}|v1"]
    async with s.get("/config_dump?resource=secrets") as r:
        assert r.status == 400
        assert "unknown resource 'secrets'" in await r.text()
    async with s.get("/config_dump", params={"name_regex": "(("}) as r:
        assert r.status == 400 and "name_regex" in await r.text()


class BigBackend(FakeBackend):
    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    async def config_dump(self, query: Any = None) -> dict[str, Any]:
        return snapshot_dump(self.snapshot)


async def test_big_dump_streams_while_the_loop_keeps_serving() -> None:
    """A 2,000-host / 10,000-route dump completes, is streamed (no Content-Length), and
    while it is produced other requests on the same loop get answers and the loop is never
    held for long (the bound is generous: CI machines are noisy)."""
    snap = big_snapshot(2000)
    adm = Admin(BigBackend(snap))
    _, port = await adm.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    lags: list[float] = []
    probes: list[int] = []

    async def lag_probe() -> None:
        while not done.is_set():
            t0 = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - t0 - 0.001)

    async def ready_probe() -> None:
        while not done.is_set():
            raw = await _raw(port, b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n")
            probes.append(int(raw.split(b" ", 2)[1]))

    async def fetch_dump() -> bytes:
        try:
            return await _raw(port, b"GET /config_dump HTTP/1.1\r\nHost: a\r\n\r\n", 60)
        finally:
            done.set()

    try:
        raw, *_ = await asyncio.gather(fetch_dump(), lag_probe(), ready_probe())
    finally:
        await adm.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length" not in head
    dump = json.loads(body)
    assert len(dump["virtual_hosts"]) == 2000 and len(dump["clusters"]) == 2001
    assert sum(len(vh["routes"]) for vh in dump["virtual_hosts"]) == 10_000
    vh = next(v for v in dump["virtual_hosts"] if v["name"] == "default/svc-7")
    assert vh["routes"][2]["meta"]["path"] == "spec.http[2]"
    assert vh["routes"][2]["matches"] == [{"uri": {"kind": "prefix", "value": "/api/v2/"}}]
    assert len(probes) >= 3 and set(probes) == {503}  # answered during the dump
    assert len(lags) >= 10
    assert max(lags) < 0.5, f"loop held for {max(lags) * 1e3:.0f} ms"


async def test_head_of_a_streamed_dump_has_no_body() -> None:
    adm = Admin(BigBackend(big_snapshot(500)))
    _, port = await adm.start("127.0.0.1", 0)
    try:
        raw = await _raw(port, b"HEAD /config_dump HTTP/1.1\r\nHost: a\r\n\r\n")
    finally:
        await adm.close()
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\n")


async def test_client_that_stops_reading_is_dropped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import meshproxy.admin as admin_mod

    monkeypatch.setattr(admin_mod, "STREAM_WRITE_TIMEOUT", 0.3)
    monkeypatch.setattr(admin_mod, "STREAM_HIGH_WATER", 16 * 1024)
    adm = Admin(BigBackend(big_snapshot(3000)))
    _, port = await adm.start("127.0.0.1", 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /config_dump HTTP/1.1\r\nHost: a\r\n\r\n")
        # never read: the server pauses encoding, then gives up on this client

        async def served_then_gone() -> None:
            while not adm._conns:
                await asyncio.sleep(0.01)
            while adm._conns:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(served_then_gone(), 10)
    finally:
        sock.close()
        await adm.close()
    assert "client stopped reading" in caplog.text


async def test_client_going_away_mid_dump_stops_the_work() -> None:
    pulled: list[int] = []

    class Counting(BigBackend):
        async def config_dump(self, query: Any = None) -> dict[str, Any]:
            doc = snapshot_dump(self.snapshot)
            section = doc["virtual_hosts"]

            class Tap(Section):
                __slots__ = ()

                def pieces(self, query: DumpQuery, memo: dict[int, Any]) -> Any:
                    for p in section.pieces(query, memo):
                        pulled.append(1)
                        yield p

            doc["virtual_hosts"] = Tap(self.snapshot)
            return doc

    adm = Admin(Counting(big_snapshot(3000)))
    _, port = await adm.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /config_dump HTTP/1.1\r\nHost: a\r\n\r\n")
        await reader.readexactly(1000)
        writer.transport.abort()
        await asyncio.sleep(0.3)
        n = len(pulled)
        await asyncio.sleep(0.3)
        assert len(pulled) == n < 3000 * 7  # stopped, well before the end
        assert not adm._conns
    finally:
        await adm.close()
