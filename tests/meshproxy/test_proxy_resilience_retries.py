"""Retries through the real data path: a DataPlane on 127.0.0.1, recording upstreams, closed
ports and resetting servers. Each test names the Envoy / Istio behaviour it pins down and fails
when the data path stops doing it (counting what the upstreams saw, not what the proxy says)."""

from __future__ import annotations

import asyncio

from meshproxy.config.model import RetryPolicy
from tests.support.dataplane import running_dataplane
from tests.support.fakes import cluster, to_cluster
from tests.support.rawhttp import get, read_response, request
from tests.support.resilience import (
    ResetServer,
    closed_port,
    fast_settings,
    route_snapshot,
    sequence,
    wait_quiescent,
)
from tests.support.upstream import Recorded, Reply, UpstreamServer


def policy(*tokens: str, attempts: int = 2, codes: tuple[int, ...] = ()) -> RetryPolicy:
    return RetryPolicy(
        attempts=attempts, retry_on=frozenset(tokens), retriable_status_codes=frozenset(codes)
    )


def post(body: bytes, *, chunked: bool = False, host: str = "svc") -> bytes:
    if chunked:
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        enc = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        return b"POST /p HTTP/1.1\r\nHost: %b\r\nTransfer-Encoding: chunked\r\n\r\n%b" % (
            host.encode(),
            enc,
        )
    return b"POST /p HTTP/1.1\r\nHost: %b\r\nContent-Length: %d\r\n\r\n%b" % (
        host.encode(),
        len(body),
        body,
    )


def one_route(ports: list[int], retries: RetryPolicy | None = None, **ckw: object):  # type: ignore[no-untyped-def]
    kw: dict[str, object] = {}
    if retries is not None:
        kw["retries"] = retries
    return route_snapshot("svc", to_cluster("svc", **kw), [cluster("svc", ports, **ckw)])


def attempt_counts(up: UpstreamServer) -> list[str | None]:
    return [r.header("x-envoy-attempt-count") for r in up.requests]


# --------------------------------------------------------------------------- default policy


async def test_default_policy_retries_connect_failures_on_other_endpoints() -> None:
    """Istio's default (no `retries` block): 2 retries on connect-failure, each to an endpoint
    not tried yet -- with two dead endpoints of three, every request still succeeds."""
    async with UpstreamServer(Reply(body=b"alive")) as up:
        snap = one_route([closed_port(), closed_port(), up.port])
        async with running_dataplane(snap, fast_settings()) as p:
            for i in range(15):
                r = await request(p.host, p.port, get(f"/{i}"))
                assert (r.status, r.body) == (200, b"alive")
            assert p.metrics.count("retries") > 0
            assert {m.flags for m in p.metrics.requests} == {"-"}
            # the live endpoint saw each request exactly once, with its attempt number
            assert len(up.requests) == 15
            assert set(attempt_counts(up)) <= {"1", "2", "3"}
            await wait_quiescent(p, "svc")


async def test_default_policy_retries_503_for_get_only_and_never_500() -> None:
    async with UpstreamServer() as up:
        async with running_dataplane(one_route([up.port]), fast_settings()) as p:
            up.handler = sequence(Reply(503, body=b"busy"), Reply(200, body=b"fine"))
            r = await request(p.host, p.port, get())
            assert (r.status, r.body) == (200, b"fine")
            assert attempt_counts(up) == ["1", "2"]

            up.requests.clear()
            up.handler = sequence(Reply(503, body=b"busy"), Reply(200, body=b"fine"))
            r = await request(p.host, p.port, post(b"order=1"))
            assert (r.status, r.body) == (503, b"busy")  # a POST is never replayed on a 503
            assert len(up.requests) == 1

            up.requests.clear()
            up.handler = sequence(Reply(500, body=b"bug"), Reply(200, body=b"fine"))
            r = await request(p.host, p.port, get())
            assert (r.status, r.body) == (500, b"bug")
            assert len(up.requests) == 1
            await wait_quiescent(p, "svc")


async def test_default_policy_503_exhausted_forwards_last_answer_with_urx() -> None:
    async with UpstreamServer(Reply(503, body=b"busy")) as up:
        async with running_dataplane(one_route([up.port]), fast_settings()) as p:
            r = await request(p.host, p.port, get())
            assert (r.status, r.body) == (503, b"busy")
            assert attempt_counts(up) == ["1", "2", "3"]
            assert p.metrics.requests[-1].flags == "URX"


async def test_default_503_retry_can_be_switched_off() -> None:
    async with UpstreamServer(sequence(Reply(503), Reply(200))) as up:
        settings = fast_settings(default_retry_503=False)
        async with running_dataplane(one_route([up.port]), settings) as p:
            r = await request(p.host, p.port, get())
            assert r.status == 503 and len(up.requests) == 1


# --------------------------------------------------------------------------- explicit policies


async def test_5xx_status_sequence_then_success_with_attempt_counts() -> None:
    async with UpstreamServer(
        sequence(Reply(503, body=b"a"), Reply(503, body=b"b"), Reply(200, body=b"c"))
    ) as up:
        snap = one_route([up.port], policy("5xx", attempts=3))
        async with running_dataplane(snap, fast_settings()) as p:
            r = await request(p.host, p.port, get())
            assert (r.status, r.body) == (200, b"c")
            assert attempt_counts(up) == ["1", "2", "3"]
            # every attempt carries the same request id
            assert len({rec.header("x-request-id") for rec in up.requests}) == 1
            assert p.metrics.requests[-1].flags == "-"
            assert p.metrics.count("retries") == 2
            await wait_quiescent(p, "svc")


async def test_attempts_exhausted_forwards_last_upstream_response_with_urx() -> None:
    n = 0

    def handler(rec: Recorded) -> Reply:
        nonlocal n
        n += 1
        return Reply(502, body=b"bad gateway %d" % n, headers=[("x-try", str(n))])

    async with UpstreamServer(handler) as up:
        snap = one_route([up.port], policy("5xx", attempts=2))
        async with running_dataplane(snap, fast_settings()) as p:
            r = await request(p.host, p.port, get())
            assert (r.status, r.body, r.header("x-try")) == (502, b"bad gateway 3", "3")
            assert attempt_counts(up) == ["1", "2", "3"]
            assert "URX" in p.metrics.requests[-1].flags.split(",")
            await wait_quiescent(p, "svc")


async def test_gateway_error_retries_502_503_504_but_not_500() -> None:
    async with UpstreamServer() as up:
        snap = one_route([up.port], policy("gateway-error"))
        async with running_dataplane(snap, fast_settings()) as p:
            for status in (502, 503, 504):
                up.requests.clear()
                up.handler = sequence(Reply(status), Reply(200))
                r = await request(p.host, p.port, get())
                assert r.status == 200 and len(up.requests) == 2, status
            up.requests.clear()
            up.handler = sequence(Reply(500), Reply(200))
            r = await request(p.host, p.port, get())
            assert r.status == 500 and len(up.requests) == 1


async def test_retriable_4xx_retries_409_only() -> None:
    async with UpstreamServer() as up:
        snap = one_route([up.port], policy("retriable-4xx"))
        async with running_dataplane(snap, fast_settings()) as p:
            up.handler = sequence(Reply(409), Reply(200))
            r = await request(p.host, p.port, get())
            assert r.status == 200 and len(up.requests) == 2
            for status in (404, 429, 503):
                up.requests.clear()
                up.handler = sequence(Reply(status), Reply(200))
                r = await request(p.host, p.port, get())
                assert r.status == status and len(up.requests) == 1


async def test_bare_status_codes_are_retried_whatever_their_value() -> None:
    """Istio's `retryOn: "404,418"` -> Envoy retriable_status_codes: any code, also below 409."""
    async with UpstreamServer() as up:
        snap = one_route([up.port], policy("retriable-status-codes", codes=(404, 418)))
        async with running_dataplane(snap, fast_settings()) as p:
            for status in (404, 418):
                up.requests.clear()
                up.handler = sequence(Reply(status), Reply(200))
                r = await request(p.host, p.port, get())
                assert r.status == 200 and len(up.requests) == 2, status
            up.requests.clear()
            up.handler = sequence(Reply(503), Reply(200))
            r = await request(p.host, p.port, get())
            assert r.status == 503 and len(up.requests) == 1


async def test_reset_after_request_sent_retried_by_reset_only() -> None:
    async with UpstreamServer() as up:
        for tokens, retried in (
            (("reset",), True),
            (("5xx",), True),
            (("reset-before-request",), False),
            (("connect-failure",), False),
        ):
            up.requests.clear()
            up.handler = sequence(Reply(reset=True), Reply(200, body=b"again"))
            snap = one_route([up.port], policy(*tokens))
            async with running_dataplane(snap, fast_settings()) as p:
                r = await request(p.host, p.port, get())
                if retried:
                    assert (r.status, r.body) == (200, b"again"), tokens
                    assert attempt_counts(up) == ["1", "2"]
                else:
                    assert r.status == 503, tokens
                    assert p.metrics.requests[-1].flags == "UC"
                    assert len(up.requests) == 1
                await wait_quiescent(p, "svc")


async def test_reset_before_request_retries_connect_failures() -> None:
    async with UpstreamServer(Reply(body=b"alive")) as up:
        snap = one_route([closed_port(), up.port], policy("reset-before-request", attempts=1))
        async with running_dataplane(snap, fast_settings()) as p:
            for _ in range(8):
                r = await request(p.host, p.port, get())
                assert (r.status, r.body) == (200, b"alive")
            assert p.metrics.count("retries") > 0


async def test_connect_failure_exhausted_is_503_uf_urx() -> None:
    snap = one_route([closed_port(), closed_port()], policy("connect-failure", attempts=3))
    async with running_dataplane(snap, fast_settings()) as p:
        r = await request(p.host, p.port, get())
        assert r.status == 503
        assert b"retried" in r.body
        assert p.metrics.requests[-1].flags == "UF,URX"
        assert p.metrics.count("retries") == 3
        await wait_quiescent(p, "svc")


async def test_attempts_zero_disables_retries() -> None:
    async with UpstreamServer(sequence(Reply(503), Reply(200))) as up:
        snap = one_route([up.port], RetryPolicy(attempts=0, retry_on=frozenset({"5xx"})))
        async with running_dataplane(snap, fast_settings()) as p:
            r = await request(p.host, p.port, get())
            assert r.status == 503 and len(up.requests) == 1
    dead = closed_port()
    snap = one_route([dead], RetryPolicy(attempts=0, retry_on=frozenset({"connect-failure"})))
    async with running_dataplane(snap, fast_settings()) as p:
        r = await request(p.host, p.port, get())
        assert r.status == 503 and p.metrics.requests[-1].flags == "UF"
        assert p.metrics.count("retries") == 0


async def test_retries_go_to_endpoints_not_yet_tried() -> None:
    """Three endpoints, two answering 503: with 2 retries every request reaches the good one,
    and no endpoint sees the same request twice (Envoy's previous_hosts predicate)."""
    async with (
        UpstreamServer(Reply(503)) as bad1,
        UpstreamServer(Reply(503)) as bad2,
        UpstreamServer(Reply(200, body=b"good")) as good,
    ):
        snap = one_route([bad1.port, bad2.port, good.port], policy("5xx", attempts=2))
        async with running_dataplane(snap, fast_settings()) as p:
            for i in range(20):
                r = await request(p.host, p.port, get(f"/{i}"))
                assert (r.status, r.body) == (200, b"good")
            for server in (bad1, bad2, good):
                ids = [rec.header("x-request-id") for rec in server.requests]
                assert len(ids) == len(set(ids))
            assert len(good.requests) == 20
            assert bad1.requests and bad2.requests  # the failing ones were tried too
            await wait_quiescent(p, "svc")


# --------------------------------------------------------------------------- bodies


async def test_post_body_replayed_byte_exact_content_length_and_chunked() -> None:
    body = bytes(range(256)) * 40 + b"\r\n0\r\n\r\n tail"
    async with UpstreamServer() as up:
        snap = one_route([up.port], policy("5xx", attempts=2))
        async with running_dataplane(snap, fast_settings()) as p:
            for chunked in (False, True):
                up.requests.clear()
                up.handler = sequence(Reply(503), Reply(503), Reply(200, body=b"stored"))
                r = await request(p.host, p.port, post(body, chunked=chunked))
                assert (r.status, r.body) == (200, b"stored")
                assert [rec.body for rec in up.requests] == [body] * 3
                for rec in up.requests:
                    if chunked:
                        assert rec.header("transfer-encoding") == "chunked"
                    else:
                        assert rec.header("content-length") == str(len(body))
            await wait_quiescent(p, "svc")


async def test_streamed_body_is_replayed_after_a_reset_mid_body() -> None:
    """The first endpoint resets after a few bytes of a body still arriving from the client:
    the retry sends what came so far from the replay buffer, then the rest as it arrives."""
    first, rest = b"A" * 3000, b"B" * 2000
    head = b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % (len(first + rest))
    async with ResetServer(after_bytes=1) as broken, UpstreamServer(Reply(body=b"got")) as good:
        snap = one_route([broken.port, good.port], policy("reset", attempts=1))
        async with running_dataplane(snap, fast_settings()) as p:
            for _ in range(40):
                reader, writer = await asyncio.open_connection(p.host, p.port)
                writer.write(head + first)
                await asyncio.sleep(0.05)
                writer.write(rest)
                r = await read_response(reader)
                writer.close()
                assert (r.status, r.body) == (200, b"got")
                assert good.requests[-1].body == first + rest
                if broken.connections >= 3:
                    break
            assert broken.connections >= 3
            await wait_quiescent(p, "svc")


async def test_body_over_the_replay_buffer_is_not_retried_once_sent() -> None:
    settings = fast_settings(retry_buffer_bytes=1024)
    async with UpstreamServer() as up:
        snap = one_route([up.port], policy("5xx", attempts=2))
        async with running_dataplane(snap, settings) as p:
            up.handler = sequence(Reply(503, body=b"no"), Reply(200))
            r = await request(p.host, p.port, post(b"x" * 1000))
            assert r.status == 200 and len(up.requests) == 2  # fits: replayed

            up.requests.clear()
            up.handler = sequence(Reply(503, body=b"no"), Reply(200))
            big = b"y" * 5000
            r = await request(p.host, p.port, post(big))
            assert (r.status, r.body) == (503, b"no")
            assert len(up.requests) == 1 and up.requests[0].body == big

            up.requests.clear()
            up.handler = sequence(Reply(503, body=b"no"), Reply(200))
            r = await request(p.host, p.port, post(big, chunked=True))
            assert (r.status, r.body) == (503, b"no") and len(up.requests) == 1
            await wait_quiescent(p, "svc")


# --------------------------------------------------------------------------- never retried


async def test_response_with_x_envoy_overloaded_is_never_retried() -> None:
    overloaded = Reply(503, headers=[("x-envoy-overloaded", "true")], body=b"shed")
    async with UpstreamServer(sequence(overloaded, Reply(200))) as up:
        snap = one_route([up.port], policy("5xx", "gateway-error", "retriable-4xx", attempts=3))
        async with running_dataplane(snap, fast_settings()) as p:
            r = await request(p.host, p.port, get())
            assert (r.status, r.body) == (503, b"shed")
            assert r.header("x-envoy-overloaded") == "true"
            assert len(up.requests) == 1
            assert p.metrics.count("retries") == 0


async def test_nothing_is_retried_after_response_bytes_reached_the_client() -> None:
    # the head and part of the body, then a reset: the client is reset, never a second try
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    async with UpstreamServer(sequence(Reply(raw=raw, raw_reset=True), Reply(200))) as up:
        snap = one_route([up.port], policy("5xx", "reset", attempts=3))
        async with running_dataplane(snap, fast_settings()) as p:
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(get())
            data = b""
            try:
                async with asyncio.timeout(5):
                    while chunk := await reader.read(65536):
                        data += chunk
            except ConnectionResetError:
                pass
            writer.close()
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"partial")
            assert len(up.requests) == 1
            await wait_quiescent(p, "svc")
            assert p.metrics.requests[-1].flags == "UC"
            assert p.metrics.count("retries") == 0


async def test_attempt_count_and_body_replay_with_header_operations_and_rewrite() -> None:
    """The general (non one-pass) request head: rewrite + header operations."""
    from meshproxy.config.model import HeaderOps, HeaderPolicy, Rewrite

    async with UpstreamServer(sequence(Reply(503), Reply(503), Reply(200, body=b"ok"))) as up:
        route = to_cluster(
            "svc",
            retries=policy("5xx", attempts=2),
            rewrite=Rewrite(authority="backend"),
            headers=HeaderPolicy(request=HeaderOps(set=(("x-added", "1"),))),
        )
        snap = route_snapshot("svc", route, [cluster("svc", [up.port])])
        async with running_dataplane(snap, fast_settings()) as p:
            r = await request(p.host, p.port, post(b"payload"))
            assert (r.status, r.body) == (200, b"ok")
            assert attempt_counts(up) == ["1", "2", "3"]
            for rec in up.requests:
                assert rec.body == b"payload"
                assert rec.header("host") == "backend" and rec.header("x-added") == "1"
                assert rec.header_all("x-envoy-attempt-count") == [
                    rec.header("x-envoy-attempt-count")
                ]


async def test_client_attempt_count_header_is_replaced() -> None:
    async with UpstreamServer(sequence(Reply(503), Reply(200))) as up:
        snap = one_route([up.port], policy("5xx", attempts=1))
        async with running_dataplane(snap, fast_settings()) as p:
            r = await request(p.host, p.port, get(extra="x-envoy-attempt-count: 7\r\n"))
            assert r.status == 200
            assert [rec.header_all("x-envoy-attempt-count") for rec in up.requests] == [
                ["1"],
                ["2"],
            ]


async def test_body_outgrowing_the_replay_buffer_during_backoff_is_507_never_truncated() -> None:
    """A retry is pending (backoff) when the body still arriving outgrows the replay buffer:
    the retry can no longer send the whole body, so the request ends with Envoy's 507
    "exceeded request buffer limit while retrying upstream" -- it never sends the upstream
    the tail of the body as if it were the whole body."""
    from meshproxy.config.model import LbKind, LoadBalancer

    settings = fast_settings(retry_buffer_bytes=4096, retry_backoff_base=0.3, retry_backoff_max=0.3)
    rr = LoadBalancer(kind=LbKind.ROUND_ROBIN)
    async with ResetServer(after_bytes=1) as broken, UpstreamServer(Reply(body=b"ok")) as good:
        snap = one_route([good.port, broken.port], policy("reset", attempts=2), lb=rr)
        async with running_dataplane(snap, settings) as p:
            p.dp._proxy.random = lambda: 0.99  # first pick: index 1 (broken); backoff 0.297 s
            reader, writer = await asyncio.open_connection(p.host, p.port)
            writer.write(
                b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"3e8\r\n"
                + b"A" * 1000
                + b"\r\n"
            )
            await asyncio.sleep(0.1)  # attempt 1 was reset; the retry waits for its backoff
            assert broken.connections == 1
            try:
                writer.write(b"1f40\r\n" + b"B" * 8000 + b"\r\n0\r\n\r\n")
                r = await read_response(reader)
            finally:
                writer.close()
            assert r.status == 507
            assert r.body == b"exceeded request buffer limit while retrying upstream"
            await asyncio.sleep(0.4)
            assert good.requests == [] and good.raw_bytes == 0
            await wait_quiescent(p, "svc")
