"""HTTP/1.1 edge cases of the data path, each found by running the proxy against a raw
upstream: real sockets on 127.0.0.1, a real DataPlane, bytes written and read raw."""

from __future__ import annotations

import asyncio

import pytest

from meshproxy.config.model import (
    HeaderOps,
    HeaderPolicy,
    Match,
    MatchKind,
    Redirect,
    Route,
    StringMatch,
    WeightedCluster,
)
from tests.support.dataplane import running_dataplane
from tests.support.fakes import META, cluster, service_snapshot, snapshot, vhost
from tests.support.rawhttp import get, is_closed, read_response, request
from tests.support.upstream import Recorded, Reply, UpstreamServer

# --------------------------------------------------------------------------- request side


async def test_upgrade_request_with_body_is_refused_and_upstream_untouched() -> None:
    async with UpstreamServer(Reply(body=b"ok")) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            for framing in (b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"):
                body = b"hello" if framing.startswith(b"Content") else b"5\r\nhello\r\n0\r\n\r\n"
                reader, writer = await asyncio.open_connection(p.host, p.port)
                writer.write(
                    b"POST /up HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\n"
                    b"Upgrade: websocket\r\n" + framing + b"\r\n" + body
                )
                r = await read_response(reader)
                assert r.status == 400
                assert await is_closed(reader)
                writer.close()
            assert up.raw_bytes == 0
            # a body-less Upgrade request is an ordinary request, Upgrade stripped
            r = await request(
                p.host,
                p.port,
                get("/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"),
            )
            assert r.status == 200 and r.body == b"ok"
            rec = up.requests[0]
            assert rec.target == "/ws" and rec.header("upgrade") is None


async def test_request_trailers_are_not_request_headers() -> None:
    async with UpstreamServer(lambda rec: Reply(body=rec.body)) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(
                b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-Trailer: t\r\nHost: evil\r\n\r\n"
            )
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"abc"
            writer.write(get("/next"))
            r = await read_response(reader)
            assert r.status == 200
            writer.close()
            for rec in up.requests:
                assert rec.header("x-trailer") is None
                assert rec.header_all("host") == ["svc"]
            assert [rec.target for rec in up.requests] == ["/", "/next"]


async def test_non_chunked_request_transfer_coding_is_501() -> None:
    async with UpstreamServer(Reply()) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(
                b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n"
            )
            r = await read_response(reader)
            assert r.status == 501
            assert await is_closed(reader)
            writer.close()
            assert up.raw_bytes == 0
            assert [(m.code, m.flags) for m in p.metrics.requests] == [(501, "DPE")]


async def test_bytes_after_connection_close_request_are_ignored() -> None:
    async with UpstreamServer(Reply(body=b"x")) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            for first in (
                get(extra="Connection: close\r\n"),
                b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n",
            ):
                reader, writer = await asyncio.open_connection(p.host, p.port)
                writer.write(first + get("/second"))
                r = await read_response(reader)
                assert r.status == 200 and r.body == b"x"
                assert await is_closed(reader)
                writer.close()
            await asyncio.sleep(0.05)
            assert [m.code for m in p.metrics.requests] == [200, 200]
            assert [rec.target for rec in up.requests] == ["/", "/"]


async def test_gzip_then_chunked_in_two_headers_is_501() -> None:
    async with UpstreamServer(Reply()) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            r = await request(
                p.host,
                p.port,
                b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            )
            assert r.status == 501
            assert up.raw_bytes == 0


# --------------------------------------------------------------------------- config values


async def test_non_latin1_header_values_and_redirect_from_config() -> None:
    wc = WeightedCluster(cluster="svc", weight=100, host="svc")
    routes = (
        Route(
            name="redir",
            meta=META,
            matches=(Match(uri=StringMatch(MatchKind.PREFIX, "/old")),),
            redirect=Redirect(uri="/€ x", code=302),
        ),
        Route(
            name="ops",
            meta=META,
            clusters=(wc,),
            total_weight=100,
            headers=HeaderPolicy(
                request=HeaderOps(set=(("x-cur", "€uro"),)),
                response=HeaderOps(set=(("x-resp", "ÿ€"),)),
            ),
        ),
    )
    async with UpstreamServer(Reply(body=b"ok")) as up:
        snap = snapshot([vhost("svc", routes)], [cluster("svc", [up.port])])
        async with running_dataplane(snap) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get("/old"))
            r = await read_response(reader)
            assert r.status == 302
            assert r.header("location") == "http://svc/%E2%82%AC%20x"
            writer.write(get("/x"))
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"ok"
            assert r.header("x-resp") == "ÿ€".encode().decode("latin-1")
            writer.close()
            assert up.requests[0].header("x-cur") == "€uro".encode().decode("latin-1")


async def test_internal_error_while_starting_is_a_500_not_a_dead_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import meshproxy.proxy as proxy_mod

    def boom(*args: object) -> object:
        raise RuntimeError("bug")

    async with UpstreamServer(Reply(body=b"ok")) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            monkeypatch.setattr(proxy_mod, "build_request_head", boom)
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            r = await read_response(reader)
            assert r.status == 500
            writer.close()
            monkeypatch.undo()
            r = await request(p.host, p.port, get())
            assert r.status == 200
            assert [m.code for m in p.metrics.requests] == [500, 200]
            assert p.state is not None


async def test_fragment_stripped_from_origin_form_target() -> None:
    async with UpstreamServer(Reply(body=b"ok")) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            r = await request(p.host, p.port, get("/a/b?q=1#frag"))
            assert r.status == 200
            assert up.requests[0].target == "/a/b?q=1"


# --------------------------------------------------------------------------- response side


async def test_reset_during_close_delimited_body_is_a_truncation() -> None:
    def handler(rec: Recorded) -> Reply:
        raw = b"HTTP/1.1 200 OK\r\n\r\npartial"
        return Reply(raw=raw, raw_reset=rec.target == "/rst")

    async with UpstreamServer(handler) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            # FIN: the end of the body, a complete chunked response
            r = await request(p.host, p.port, get("/fin"))
            assert r.status == 200 and r.body == b"partial" and r.chunked
            # RST: the client must not take it for complete
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get("/rst"))
            with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
                await read_response(reader)
            writer.close()
            await asyncio.sleep(0.05)
            assert [(m.code, m.flags) for m in p.metrics.requests] == [(200, "-"), (200, "UC")]


async def test_head_response_with_stray_body_does_not_leak_into_next_exchange() -> None:
    def handler(rec: Recorded) -> Reply:
        if rec.method == "HEAD":
            return Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY", raw_keep=True)
        return Reply(body=b"real")

    async with UpstreamServer(handler) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(b"HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\n" + get("/g"))
            r = await read_response(reader, head_request=True)
            assert r.status == 200 and r.header("content-length") == "5"
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"real"
            writer.write(get("/g2"))
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"real"
            writer.close()
            # the out-of-step connection was not reused
            assert up.connections == 2
            assert [m.code for m in p.metrics.requests] == [200, 200, 200]


async def test_204_followed_by_stray_bytes_closes_upstream_connection() -> None:
    def handler(rec: Recorded) -> Reply:
        if rec.target == "/204":
            return Reply(
                raw=b"HTTP/1.1 204 No Content\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY",
                raw_keep=True,
            )
        return Reply(body=b"real")

    async with UpstreamServer(handler) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get("/204") + get("/g"))
            r = await read_response(reader)
            assert r.status == 204
            r = await read_response(reader)
            assert r.status == 200 and r.body == b"real"
            writer.close()
            assert up.connections == 2


async def test_response_transfer_coding_other_than_chunked_is_upe() -> None:
    def handler(rec: Recorded) -> Reply:
        te = {"/gz": "gzip, chunked", "/two": "chunked, gzip"}.get(rec.target)
        if te is None:
            return Reply(body=b"fine")
        return Reply(
            raw=f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n".encode()
            + b"3\r\nabc\r\n0\r\n\r\n"
        )

    async with UpstreamServer(handler) as up:
        async with running_dataplane(service_snapshot("svc", [up.port])) as p:
            for path in ("/gz", "/two"):
                r = await request(p.host, p.port, get(path))
                assert r.status == 503, path
                assert b"protocol error" in r.body
            r = await request(p.host, p.port, get("/ok"))
            assert r.status == 200 and r.body == b"fine"
            assert [(m.code, m.flags) for m in p.metrics.requests] == [
                (503, "UPE"),
                (503, "UPE"),
                (200, "-"),
            ]
