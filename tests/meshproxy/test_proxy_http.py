"""The HTTP/1.x data path end to end: real sockets on 127.0.0.1, a real DataPlane, a recording
upstream. Bytes are written and read raw so framing is asserted exactly."""

from __future__ import annotations

import asyncio
import re

import pytest

from meshproxy.config.model import (
    ConnectionPool,
    DirectResponse,
    HeaderOps,
    HeaderPolicy,
    Match,
    MatchKind,
    Redirect,
    Rewrite,
    Route,
    StringMatch,
    WeightedCluster,
)
from meshproxy.settings import Settings
from tests.support.dataplane import running_dataplane
from tests.support.fakes import META, cluster, service_snapshot, snapshot, to_cluster, vhost
from tests.support.rawhttp import get, is_closed, read_response, request
from tests.support.upstream import Recorded, Reply, UpstreamServer

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# --------------------------------------------------------------------------- basics


async def test_keep_alive_reuses_one_upstream_connection() -> None:
    async with UpstreamServer(Reply(body=b"hello")) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            for i in range(20):
                writer.write(get(f"/r{i}"))
                r = await read_response(reader)
                assert r.status == 200 and r.body == b"hello"
                assert not r.has("connection")
            writer.close()
            # new client connections reuse the pooled upstream connection too
            for _ in range(5):
                r = await request(p.host, p.port, get())
                assert r.status == 200
            assert len(up.requests) == 25
            assert up.connections == 1
            assert p.metrics.opened == {"svc": 1}
            assert [m.code for m in p.metrics.requests] == [200] * 25
            assert {m.flags for m in p.metrics.requests} == {"-"}


async def test_pipelined_requests_answered_in_order() -> None:
    delays = {"/a": 0.3, "/b": 0.0, "/c": 0.1}

    def handler(rec: Recorded) -> Reply:
        return Reply(body=rec.target.encode(), delay=delays[rec.target])

    async with UpstreamServer(handler) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get("/a") + get("/b") + get("/c"))
            bodies = [(await read_response(reader)).body for _ in range(3)]
            assert bodies == [b"/a", b"/b", b"/c"]
            writer.close()


async def test_pipelined_posts_with_bodies() -> None:
    async with UpstreamServer(lambda rec: Reply(body=rec.body.upper())) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            data = b""
            for word in (b"one", b"two", b"three"):
                data += b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%b" % (
                    len(word),
                    word,
                )
            writer.write(data)
            bodies = [(await read_response(reader)).body for _ in range(3)]
            assert bodies == [b"ONE", b"TWO", b"THREE"]
            writer.close()


async def test_http10_client_keep_alive_and_default_close() -> None:
    async with UpstreamServer(Reply(body=b"x")) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get(version="1.0", extra="Connection: keep-alive\r\n"))
            r = await read_response(reader)
            assert r.version == "HTTP/1.0" and r.header("connection") == "keep-alive"
            writer.write(get(version="1.0"))
            r = await read_response(reader)
            assert r.status == 200 and r.header("connection") == "close"
            assert await is_closed(reader)
            # the upstream got HTTP/1.1 requests on one connection
            assert {rec.version for rec in up.requests} == {"1.1"}
            assert up.connections == 1


# --------------------------------------------------------------------------- bodies


async def test_chunked_request_streamed_upstream() -> None:
    async with UpstreamServer(lambda rec: Reply(body=b"%d" % len(rec.body))) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"hello ", b"chunked ", b"world"):
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.02)
            writer.write(b"0\r\n\r\n")
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"19"
            rec = up.requests[0]
            assert rec.body == b"hello chunked world"
            assert rec.header("transfer-encoding") == "chunked"
            assert rec.header("content-length") is None
            writer.close()


async def test_chunked_response_streamed_to_client() -> None:
    chunks = [b"a" * 10, b"b" * 5000, b"c"]
    async with UpstreamServer(Reply(chunks=chunks, chunk_delay=0.01)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            r = await read_response(reader)
            assert r.chunked and r.body == b"".join(chunks)
            writer.write(get())  # still keep-alive
            r = await read_response(reader)
            assert r.body == b"".join(chunks)
            assert up.connections == 1
            writer.close()


async def test_close_delimited_response_rechunked_for_http11() -> None:
    async with UpstreamServer(Reply(body=b"until close", close_delimited=True)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            r = await read_response(reader)
            assert r.status == 200 and r.chunked and r.body == b"until close"
            # the client connection stays usable
            writer.write(get())
            r = await read_response(reader)
            assert r.body == b"until close"
            writer.close()
            assert up.connections == 2  # the upstream closed each one


async def test_close_delimited_response_to_http10_client() -> None:
    async with UpstreamServer(Reply(body=b"until close", close_delimited=True)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get(version="1.0", extra="Connection: keep-alive\r\n"))
            r = await read_response(reader)
            assert r.status == 200 and not r.chunked
            assert r.header("content-length") is None
            assert r.header("connection") == "close"
            assert r.body == b"until close"  # read until EOF
            writer.close()


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_responses_without_body(method: str, status: int) -> None:
    reply = Reply(status=status, body=b"0123456789", no_content_length=status == 204)
    async with UpstreamServer(reply) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            for _ in range(2):
                writer.write(f"{method} / HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
                r = await read_response(reader, head_request=True)
                assert r.status == status
                assert r.header("transfer-encoding") is None
                if method == "HEAD":
                    assert r.header("content-length") == "10"
            # nothing but the heads arrived: a following request parses cleanly
            writer.write(f"{method} /again HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
            r = await read_response(reader, head_request=True)
            assert r.status == status
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(1), 0.2)
            assert up.connections == 1
            writer.close()


# --------------------------------------------------------------------------- headers


async def test_hop_by_hop_headers_removed_both_ways() -> None:
    reply = Reply(
        headers=[
            ("Connection", "x-up-private"),
            ("X-Up-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Kept", "yes"),
        ]
    )
    async with UpstreamServer(reply) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            r = await request(
                p.host,
                p.port,
                get(
                    extra=(
                        "Connection: keep-alive, X-Private\r\n"
                        "X-Private: secret\r\n"
                        "Keep-Alive: timeout=5\r\n"
                        "Proxy-Connection: keep-alive\r\n"
                        "TE: trailers\r\n"
                        "Trailer: x\r\n"
                        "Upgrade: h2c\r\n"
                        "Proxy-Authorization: Basic eA==\r\n"
                        "X-Other: kept\r\n"
                    )
                ),
            )
            rec = up.requests[0]
            names = {n for n, _ in rec.headers}
            for gone in (
                "connection",
                "x-private",
                "keep-alive",
                "proxy-connection",
                "te",
                "trailer",
                "upgrade",
                "proxy-authorization",
            ):
                assert gone not in names, gone
            assert rec.header("x-other") == "kept"
            assert rec.header("x-envoy-attempt-count") == "1"
            rnames = {n for n, _ in r.headers}
            assert "x-up-private" not in rnames
            assert "keep-alive" not in rnames
            assert "proxy-connection" not in rnames
            assert r.header("x-kept") == "yes"


async def test_request_id_generated_or_kept_and_forwarded_headers() -> None:
    async with UpstreamServer() as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            await request(p.host, p.port, get())
            await request(
                p.host,
                p.port,
                get(
                    extra="X-Request-Id: my-id\r\nX-Forwarded-For: 10.0.0.1\r\n"
                    "X-Forwarded-Proto: https\r\n"
                ),
            )
            first, second = up.requests
            rid = first.header("x-request-id")
            assert rid is not None and UUID4.match(rid)
            assert first.header("x-forwarded-for") == "127.0.0.1"
            assert first.header("x-forwarded-proto") == "http"
            assert second.header("x-request-id") == "my-id"
            assert second.header("x-forwarded-for") == "10.0.0.1, 127.0.0.1"
            assert second.header("x-forwarded-proto") == "https"
            ids = set()
            for _ in range(50):
                await request(p.host, p.port, get())
                ids.add(up.requests[-1].header("x-request-id"))
            assert len(ids) == 50


async def test_absolute_form_routed_by_url_authority() -> None:
    async with UpstreamServer() as up:
        async with running_dataplane(service_snapshot("reviews", [up.port])) as p:
            r = await request(
                p.host,
                p.port,
                b"GET http://Reviews:9080/x?y=1 HTTP/1.1\r\nHost: elsewhere\r\n\r\n",
            )
            assert r.status == 200
            rec = up.requests[0]
            assert rec.target == "/x?y=1"
            assert rec.header("host") == "Reviews:9080"
            # an http_proxy client without a Host header
            r = await request(p.host, p.port, b"GET http://reviews/ HTTP/1.0\r\n\r\n")
            assert r.status == 200 and up.requests[1].target == "/"


async def test_expect_100_continue() -> None:
    async with UpstreamServer(lambda rec: Reply(body=rec.body)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(
                b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
            )
            interim = await read_response(reader)
            assert interim.status == 100
            writer.write(b"hello")
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"hello"
            assert up.requests[0].header("expect") is None
            writer.close()
            # a local answer (no route) is sent without 100 Continue, and the connection closes
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(
                b"POST / HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            r = await read_response(reader)
            assert r.status == 404
            assert await is_closed(reader)
            writer.close()


# --------------------------------------------------------------------------- local answers


async def test_no_route_404_nr() -> None:
    m = Match(uri=StringMatch(MatchKind.PREFIX, "/only"))
    route = Route(
        name="r",
        meta=META,
        matches=(m,),
        clusters=(WeightedCluster(cluster="svc", weight=100, host="svc"),),
        total_weight=100,
    )
    async with UpstreamServer() as up:
        snap = snapshot([vhost("svc", (route,))], [cluster("svc", [up.port])])
        async with running_dataplane(snap) as p:
            r = await request(p.host, p.port, get(host="unknown"))
            assert r.status == 404 and r.body == b""
            r = await request(p.host, p.port, get("/other"))
            assert r.status == 404
            r = await request(p.host, p.port, get("/only/x"))
            assert r.status == 200
            assert [(m.code, m.flags) for m in p.metrics.requests] == [
                (404, "NR"),
                (404, "NR"),
                (200, "-"),
            ]


async def test_no_endpoints_503_uh() -> None:
    snap = snapshot([vhost("svc", (to_cluster("svc"),))], [cluster("svc", [])])
    async with running_dataplane(snap) as p:
        r = await request(p.host, p.port, get())
        assert r.status == 503 and r.body == b"no healthy upstream"
        assert r.header("content-type") == "text/plain"
        assert (p.metrics.requests[0].code, p.metrics.requests[0].flags) == (503, "UH")
        assert p.metrics.requests[0].cluster == "svc"


async def test_connect_failure_503_uf() -> None:
    up = await UpstreamServer().start()
    port = up.port
    await up.close()  # nothing listens there any more
    async with running_dataplane(service_snapshot("svc", [port])) as p:
        reader, writer = await asyncio.open_connection(p.host, p.port)
        writer.write(get())
        r = await read_response(reader)
        assert r.status == 503
        # Istio's default policy retries a connect failure twice; then Envoy's body and flags
        assert r.body == (
            b"upstream connect error or disconnect/reset before headers. "
            b"retried and the latest reset reason: connection failure"
        )
        writer.write(get())  # the client connection survives a local reply
        r = await read_response(reader)
        assert r.status == 503
        writer.close()
        assert [m.flags for m in p.metrics.requests] == ["UF,URX", "UF,URX"]
        assert p.metrics.count("retries") == 4


async def test_upstream_reset_before_headers_503_uc() -> None:
    async with UpstreamServer(Reply(reset=True)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            r = await request(p.host, p.port, get())
            assert r.status == 503
            assert r.body.endswith(b"reset reason: connection termination")
            assert p.metrics.requests[0].flags == "UC"


async def test_upstream_reset_mid_body_resets_client() -> None:
    async with UpstreamServer(Reply(body=b"x" * 10)) as up:
        # answer a body shorter than its Content-Length, then close
        up.handler = Reply(
            headers=[("Content-Length", "100")], body=b"short", no_content_length=True, close=True
        )
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"200" in head.split(b"\r\n")[0]
            rest = b""
            try:
                while chunk := await asyncio.wait_for(reader.read(1000), 2):
                    rest += chunk
            except ConnectionResetError:
                pass
            assert rest == b"short"  # then the connection ended, not a complete response
            assert p.metrics.requests[0].flags == "UC"
            writer.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n",
    ],
)
async def test_upstream_protocol_error_503_upe(raw: bytes) -> None:
    async with UpstreamServer(Reply(raw=raw)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            r = await request(p.host, p.port, get())
            assert r.status == 503
            assert r.body.endswith(b"reset reason: protocol error")
            assert p.metrics.requests[0].flags == "UPE"


async def test_upstream_interim_100_is_swallowed() -> None:
    async with UpstreamServer(Reply(interim_100=True, body=b"final")) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"final"
            writer.close()


async def test_redirect_and_direct_response() -> None:
    routes = (
        Route(
            name="redir",
            meta=META,
            matches=(Match(uri=StringMatch(MatchKind.PREFIX, "/old")),),
            redirect=Redirect(uri="/new", code=302),
        ),
        Route(
            name="dr",
            meta=META,
            matches=(Match(uri=StringMatch(MatchKind.EXACT, "/health")),),
            direct_response=DirectResponse(status=418, body=b"teapot"),
        ),
    )
    async with running_dataplane(snapshot([vhost("svc", routes)], [])) as p:
        r = await request(p.host, p.port, get("/old/x?q=1"))
        assert r.status == 302 and r.header("location") == "http://svc/new?q=1"
        r = await request(p.host, p.port, get("/health"))
        assert r.status == 418 and r.body == b"teapot"
        r = await request(
            p.host, p.port, b"HEAD /health HTTP/1.1\r\nHost: svc\r\n\r\n", head_request=True
        )
        assert r.status == 418 and r.header("content-length") == "6"


async def test_rewrite_and_header_operations() -> None:
    async with UpstreamServer(Reply(headers=[("X-Upstream-Secret", "s"), ("X-Resp", "old")])) as up:
        wc = WeightedCluster(
            cluster="svc",
            weight=100,
            host="svc",
            headers=HeaderPolicy(
                request=HeaderOps(set=(("x-dest", "d"),)),
                response=HeaderOps(add=(("x-dest-resp", "dr"),)),
            ),
        )
        route = Route(
            name="rw",
            meta=META,
            matches=(Match(uri=StringMatch(MatchKind.PREFIX, "/api/")),),
            clusters=(wc,),
            total_weight=100,
            rewrite=Rewrite(uri="/v2/", authority="backend.internal"),
            headers=HeaderPolicy(
                request=HeaderOps(
                    set=(("x-set", "1"),), add=(("x-add", "a"),), remove=("x-remove-me",)
                ),
                response=HeaderOps(set=(("x-resp", "new"),), remove=("x-upstream-secret",)),
            ),
        )
        snap = snapshot([vhost("svc", (route,))], [cluster("svc", [up.port])])
        async with running_dataplane(snap) as p:
            r = await request(
                p.host,
                p.port,
                get("/api/items?x=1", extra="X-Remove-Me: 1\r\nX-Set: client\r\n"),
            )
            rec = up.requests[0]
            assert rec.target == "/v2/items?x=1"
            assert rec.header("x-envoy-original-path") == "/api/items?x=1"
            assert rec.header("host") == "backend.internal"
            assert rec.header_all("x-set") == ["1"]
            assert rec.header("x-add") == "a"
            assert rec.header("x-remove-me") is None
            assert rec.header("x-dest") == "d"
            assert r.header("x-resp") == "new"
            assert r.header("x-upstream-secret") is None
            assert r.header("x-dest-resp") == "dr"


async def test_route_header_set_wins_over_destination_set() -> None:
    """Envoy applies the weighted cluster's header mutations first, then the route's, so when
    both ``set`` the same header the route's value is what the upstream / client sees."""
    async with UpstreamServer(Reply(headers=[("X-Both", "upstream")])) as up:
        wc = WeightedCluster(
            cluster="svc",
            weight=100,
            host="svc",
            headers=HeaderPolicy(
                request=HeaderOps(set=(("x-both", "dest"), ("x-dest-only", "d"))),
                response=HeaderOps(set=(("x-both", "dest"),), add=(("x-trail", "dest"),)),
            ),
        )
        route = Route(
            name="r",
            meta=META,
            clusters=(wc,),
            total_weight=100,
            headers=HeaderPolicy(
                request=HeaderOps(set=(("x-both", "route"),), remove=("x-dest-only",)),
                response=HeaderOps(set=(("x-both", "route"),), add=(("x-trail", "route"),)),
            ),
        )
        snap = snapshot([vhost("svc", (route,))], [cluster("svc", [up.port])])
        async with running_dataplane(snap) as p:
            r = await request(p.host, p.port, get("/", extra="X-Both: client\r\n"))
            rec = up.requests[0]
            assert rec.header_all("x-both") == ["route"]
            # the route's remove runs after the destination's set
            assert rec.header("x-dest-only") is None
            assert r.header_all("x-both") == ["route"]
            assert r.header_all("x-trail") == ["dest", "route"]


# --------------------------------------------------------------------------- hardening


BAD_REQUESTS = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "bad_cl": b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3x\r\n\r\nabc",
    "conflicting_cl": b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "bad_chunk": b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "bad_request_line": b"GET /\r\nHost: svc\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "missing_host": b"GET / HTTP/1.1\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n",
    "bad_te": b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : svc\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
async def test_malformed_request_400_closed_and_nothing_upstream(name: str) -> None:
    async with UpstreamServer() as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(BAD_REQUESTS[name])
            r = await read_response(reader)
            assert r.status == 400
            assert r.header("connection") == "close"
            assert await is_closed(reader)
            writer.close()
            await asyncio.sleep(0.05)
            assert up.connections == 0 and up.raw_bytes == 0
            assert p.metrics.requests[-1].code == 400


async def test_head_too_large_431() -> None:
    async with UpstreamServer() as up:
        settings = Settings(max_head_bytes=4096, max_headers=10)
        async with running_dataplane(service_snapshot("svc", [up.port]), settings) as p:
            big = get(extra="X-Big: " + "a" * 5000 + "\r\n")
            many = get(extra="".join(f"X-H{i}: v\r\n" for i in range(20)))
            long_url = get("/" + "u" * 5000)
            for raw in (big, many, long_url):
                reader, writer = await asyncio.open_connection(p.host, p.port)
                writer.write(raw)
                r = await read_response(reader)
                assert r.status == 431
                assert await is_closed(reader)
                writer.close()
            # a head that never ends is cut off too (bounded buffering)
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Endless: ")
            try:
                for _ in range(10):
                    writer.write(b"a" * 1000)
                    await writer.drain()
                    await asyncio.sleep(0.01)
            except (ConnectionResetError, BrokenPipeError):
                pass
            r = await read_response(reader)
            assert r.status == 431
            writer.close()
            assert up.raw_bytes == 0
            # within the limits is fine
            r = await request(
                p.host, p.port, get(extra="".join(f"X-H{i}: v\r\n" for i in range(8)))
            )
            assert r.status == 200


async def test_framing_error_mid_body_never_completes_upstream_request() -> None:
    async with UpstreamServer(Reply(delay=1.0)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            for _ in range(100):  # the head and first chunk reach the upstream
                if up.raw_bytes:
                    break
                await asyncio.sleep(0.01)
            assert up.raw_bytes > 0
            writer.write(b"nonsense\r\n")
            r = await read_response(reader)
            assert r.status == 400
            assert await is_closed(reader)
            writer.close()
            await asyncio.sleep(0.1)
            assert up.requests == []  # the upstream never saw a complete request
            assert up.open_connections == 0  # it was reset


async def test_slowloris_408() -> None:
    settings = Settings(head_read_timeout=0.3)
    async with UpstreamServer() as up:
        async with running_dataplane(service_snapshot("svc", [up.port]), settings) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(b"GET / HTTP/1.1\r\n")
            for _ in range(3):
                await asyncio.sleep(0.05)
                writer.write(b"X-A: b\r\n")
            r = await read_response(reader, timeout=2)
            assert r.status == 408
            assert await is_closed(reader)
            writer.close()
            assert up.raw_bytes == 0


async def test_idle_keep_alive_connection_closed_silently() -> None:
    settings = Settings(downstream_idle_timeout=0.3)
    async with UpstreamServer() as up:
        async with running_dataplane(service_snapshot("svc", [up.port]), settings) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            assert (await read_response(reader)).status == 200
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await is_closed(reader, timeout=2)
            assert 0.2 < loop.time() - t0 < 1.5
            writer.close()
            assert p.dp.active_connections == 0


# --------------------------------------------------------------------------- drain


async def test_drain_closes_idle_now_and_busy_after_response() -> None:
    async with UpstreamServer(lambda rec: Reply(delay=0.3 if rec.target == "/slow" else 0)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            idle_r, idle_w = await asyncio.open_connection(p.host, p.port)
            idle_w.write(get())
            assert (await read_response(idle_r)).status == 200
            busy_r, busy_w = await asyncio.open_connection(p.host, p.port)
            busy_w.write(get("/slow"))
            await asyncio.sleep(0.1)
            assert p.dp.active_requests == 1
            p.dp.stop_accepting()
            p.dp.close_idle()
            assert await is_closed(idle_r, timeout=0.5)
            r = await read_response(busy_r)
            assert r.status == 200 and r.header("connection") == "close"
            assert await is_closed(busy_r)
            assert await p.dp.wait_drained(2.0)
            assert p.dp.active_connections == 0 and p.dp.active_requests == 0
            with pytest.raises(OSError):
                await asyncio.open_connection(p.host, p.port)
            idle_w.close()
            busy_w.close()


# --------------------------------------------------------------------------- balancing


async def test_consistent_hash_sticks_through_the_real_path() -> None:
    from meshproxy.config.model import ConsistentHash, LbKind, LoadBalancer

    ups = [await UpstreamServer(Reply(body=b"%d" % i)).start() for i in range(3)]
    try:
        lb = LoadBalancer(kind=LbKind.CONSISTENT_HASH, hash=ConsistentHash(header="x-user"))
        snap = service_snapshot("svc", [u.port for u in ups], lb=lb)
        async with running_dataplane(snap) as p:
            seen: dict[str, set[bytes]] = {}
            # 16 keys: all on one of 3 endpoints by chance is 3 x (1/3)^16 (the ring depends on
            # the OS-chosen ports)
            for user in [f"user-{i}" for i in range(16)]:
                for _ in range(3):
                    r = await request(p.host, p.port, get(extra=f"X-User: {user}\r\n"))
                    seen.setdefault(user, set()).add(r.body)
            assert all(len(v) == 1 for v in seen.values()), seen
            assert len(set().union(*seen.values())) >= 2  # keys spread over endpoints
    finally:
        for u in ups:
            await u.close()


async def test_clusters_view_and_endpoint_removal_closes_idle() -> None:
    async with UpstreamServer() as a, UpstreamServer() as b:
        snap = service_snapshot("svc", [a.port, b.port])
        async with running_dataplane(snap) as p:
            for _ in range(6):
                assert (await request(p.host, p.port, get())).status == 200
            view = p.dp.clusters_view()
            assert view["clusters"][0]["name"] == "svc"
            eps = view["clusters"][0]["endpoints"]
            assert {e["address"] for e in eps} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
            assert all(e["healthy"] and not e["ejected"] and e["ejections"] == 0 for e in eps)
            assert all(e["active_requests"] == 0 for e in eps)
            assert a.open_connections >= 1 or b.open_connections >= 1
            p.state.apply(service_snapshot("svc", [a.port], version="v2"))
            await asyncio.sleep(0.1)
            assert b.open_connections == 0  # idle connections to the removed endpoint closed
            for _ in range(3):
                assert (await request(p.host, p.port, get())).status == 200
            eps = p.dp.clusters_view()["clusters"][0]["endpoints"]
            assert [e["address"] for e in eps] == [f"127.0.0.1:{a.port}"]


async def test_max_requests_per_connection() -> None:
    async with UpstreamServer() as up:
        c = cluster("svc", [up.port], pool=ConnectionPool(max_requests_per_connection=2))
        snap = snapshot([vhost("svc", (to_cluster("svc"),))], [c])
        async with running_dataplane(snap) as p:
            for _ in range(6):
                assert (await request(p.host, p.port, get())).status == 200
            assert up.connections == 3


async def test_upstream_idle_timeout_closes_pooled_connection() -> None:
    async with UpstreamServer() as up:
        settings = Settings(upstream_idle_timeout=0.2)
        async with running_dataplane(service_snapshot("svc", [up.port]), settings) as p:
            assert (await request(p.host, p.port, get())).status == 200
            assert up.open_connections == 1
            await asyncio.sleep(0.5)
            assert up.open_connections == 0
            assert (await request(p.host, p.port, get())).status == 200
            assert up.connections == 2


# --------------------------------------------------------------------------- more edges


async def test_long_pipeline_is_bounded_and_ordered() -> None:
    async with UpstreamServer(lambda rec: Reply(body=rec.target.encode())) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(b"".join(get(f"/{i}") for i in range(60)))
            bodies = [(await read_response(reader)).body for _ in range(60)]
            assert bodies == [f"/{i}".encode() for i in range(60)]
            assert up.connections == 1
            writer.close()


async def test_ipv6_listener() -> None:
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    async with UpstreamServer() as up:
        from meshproxy.dataplane import DataPlane
        from meshproxy.state import State
        from tests.support.fakes import FakeMetrics

        state = State()
        state.apply(service_snapshot("svc", [up.port]))
        dp = DataPlane(state, FakeMetrics(), Settings())  # type: ignore[arg-type]
        try:
            try:
                host, port = await dp.start_outbound("[::1]", 0)
            except OSError:
                pytest.skip("::1 not configured")
            assert host == "::1" and port > 0
            r = await request("::1", port, get())
            assert r.status == 200
            assert up.requests[0].header("x-forwarded-for") == "::1"
        finally:
            await dp.close()


async def test_connect_timeout_503_uf() -> None:
    import socket

    # A listener that never accepts, with its accept queue filled: SYNs go unanswered.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        await asyncio.sleep(0.1)
        c = cluster("svc", [port], pool=ConnectionPool(connect_timeout=0.3))
        snap = snapshot([vhost("svc", (to_cluster("svc"),))], [c])
        async with running_dataplane(snap) as p:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await request(p.host, p.port, get(), timeout=5)
            elapsed = loop.time() - t0
            # Istio's default policy: 1 + 2 retries, each bounded by the connect deadline
            assert r.status == 503 and p.metrics.requests[0].flags == "UF,URX"
            assert 0.85 <= elapsed < 4.0  # three connect deadlines, not a refusal
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


async def test_client_disconnect_mid_response_is_dc_and_frees_upstream() -> None:
    async with UpstreamServer(Reply(chunks=[b"x" * 100] * 20, chunk_delay=0.05)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            await reader.readuntil(b"\r\n\r\n")
            writer.close()
            for _ in range(100):
                if p.metrics.requests:
                    break
                await asyncio.sleep(0.02)
            assert p.metrics.requests[0].flags == "DC"
            assert p.dp.active_requests == 0
            eps = p.dp.clusters_view()["clusters"][0]["endpoints"]
            assert eps[0]["active_requests"] == 0
            await asyncio.sleep(0.1)
            assert up.open_connections == 0  # the half-read upstream connection was not pooled
