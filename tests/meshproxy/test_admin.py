"""Admin: generic config serialisation (pure) and the HTTP endpoints on a real socket."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.admin import Admin, snapshot_dump, to_jsonable
from meshproxy.config.model import (
    Cluster,
    Endpoint,
    LbKind,
    LoadBalancer,
    Match,
    MatchKind,
    Meta,
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


def test_to_jsonable_handles_model_types() -> None:
    d = to_jsonable(sample_snapshot())
    json.dumps(d)  # fully serialisable
    route = d["routes"]["exact"]["reviews"]["routes"][0]
    assert route["meta"] == VS.as_dict()
    assert route["matches"][0]["uri"] == {
        "kind": "regex",
        "value": "/r.*",
        "ignore_case": False,
        "regex": "/r.*",
    }
    assert route["retries"]["retry_on"] == sorted(route["retries"]["retry_on"])
    assert to_jsonable(b"hi") == "hi"


def test_snapshot_dump_shape() -> None:
    dump = snapshot_dump(
        sample_snapshot(),
        last_error="f.yaml: VirtualService/x: spec: bad",
        listeners=[{"name": "outbound", "address": "127.0.0.1:1"}],
    )
    json.dumps(dump)
    assert dump["version"] == "abc"
    assert dump["last_error"].startswith("f.yaml")
    assert dump["listeners"][0]["name"] == "outbound"
    (vh,) = dump["virtual_hosts"]  # two aliases, one virtual host
    assert vh["aliases"] == ["reviews", HOST]
    assert vh["meta"]["kind"] == "VirtualService"
    route = vh["routes"][0]
    assert [c["weight"] for c in route["clusters"]] == [90, 10]
    assert route["matches"][0]["headers"] == [
        ["end-user", {"kind": "exact", "value": "jason", "ignore_case": False, "regex": None}]
    ]
    (cluster,) = dump["clusters"]
    assert cluster["meta"]["kind"] == "ServiceEntry"
    assert cluster["policy_meta"]["kind"] == "DestinationRule"
    assert cluster["lb"]["kind"] == "ROUND_ROBIN"
    assert cluster["endpoints"][0]["labels"] == {"version": "v1"}


class FakeBackend:
    def __init__(self) -> None:
        self.ready = False
        self.drained = 0
        self.quit = asyncio.Event()
        self.metrics = Metrics()

    async def is_ready(self) -> bool:
        return self.ready

    async def config_dump(self) -> dict[str, Any]:
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
