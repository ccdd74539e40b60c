"""The codec's pure decisions: targets, authorities, header filtering, framing, serialization,
and the one mapping from failures to Envoy's local replies. No sockets, no event loop."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.errors import Failure, local_reply
from meshproxy.http.codec import (
    BodyFraming,
    TargetError,
    downstream_body_framing,
    encode_chunk,
    filter_response_headers,
    local_reply_bytes,
    new_request_id,
    parse_target,
    prepare_request_headers,
    request_head,
    response_head,
    split_authority,
    status_line,
    upstream_body_framing,
    upstream_request,
)

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a/b?x=1", (None, None, "/a/b?x=1")),
        ("*", (None, None, "*")),
        ("http://Reviews:9080/x?y", ("http", "Reviews:9080", "/x?y")),
        ("http://reviews", ("http", "reviews", "/")),
        ("http://reviews?q=1", ("http", "reviews", "/?q=1")),
        ("HTTPS://h/p#frag", ("https", "h", "/p")),
        ("http://[::1]:8080/p", ("http", "[::1]:8080", "/p")),
    ],
)
def test_parse_target(target: str, expected: tuple[str | None, str | None, str]) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize(
    "target", ["reviews:443", "ftp://h/x", "http:///x", "http://user@h/x", "x", ""]
)
def test_parse_target_rejects(target: str) -> None:
    with pytest.raises(TargetError):
        parse_target(target)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("Reviews:9080", ("reviews", 9080)),
        ("reviews", ("reviews", None)),
        ("reviews.default.svc.cluster.local.", ("reviews.default.svc.cluster.local", None)),
        ("[::1]:80", ("::1", 80)),
        ("[::1]", ("::1", None)),
        ("h:", ("h", None)),
        ("h:abc", ("h", None)),
        ("", ("", None)),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority) == expected


# --------------------------------------------------------------------------- request headers


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [n for n, _ in headers]


def test_request_hop_by_hop_and_connection_named_headers_dropped() -> None:
    headers = [
        ("connection", "keep-alive, X-Private, host"),
        ("x-private", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("proxy-authorization", "Basic x"),
        ("expect", "100-continue"),
        ("content-length", "3"),
        ("accept", "*/*"),
    ]
    out, rid = prepare_request_headers(headers, host="svc:80", client_ip="10.1.1.1", scheme="http")
    assert names(out) == [
        "host",
        "accept",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "x-envoy-attempt-count",
    ]
    assert dict(out)["host"] == "svc:80"  # "host" in Connection cannot remove it
    assert UUID4.match(rid) and dict(out)["x-request-id"] == rid
    assert dict(out)["x-envoy-attempt-count"] == "1"


def test_request_forwarding_headers() -> None:
    out, rid = prepare_request_headers(
        [
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "abc"),
        ],
        host="h",
        client_ip="3.3.3.3",
        scheme="http",
        attempt=2,
    )
    d = dict(out)
    assert d["x-forwarded-for"] == "1.1.1.1,2.2.2.2, 3.3.3.3"
    assert d["x-forwarded-proto"] == "https"
    assert rid == "abc" and d["x-request-id"] == "abc"
    assert d["x-envoy-attempt-count"] == "2"


def test_connection_can_name_forwarding_headers_away() -> None:
    ur = upstream_request(
        [(b"connection", b"X-Request-Id"), (b"x-request-id", b"client")],
        host="h",
        client_ip="1.2.3.4",
        scheme="http",
    )
    assert ur.request_id != b"client"
    assert dict(ur.headers)[b"x-request-id"] == ur.request_id


def test_request_ids_are_uuid4_and_unique() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(UUID4.match(i) for i in ids)


def test_request_head_serialization() -> None:
    hs = [(b"host", b"svc"), (b"accept", b"*/*")]
    assert request_head("GET", "/x", hs, BodyFraming.NONE, None) == (
        b"GET /x HTTP/1.1\r\nhost: svc\r\naccept: */*\r\n\r\n"
    )
    assert request_head("POST", "/", hs[:1], BodyFraming.LENGTH, 0).endswith(
        b"content-length: 0\r\n\r\n"
    )
    assert request_head("POST", "/", hs[:1], BodyFraming.CHUNKED, None).endswith(
        b"transfer-encoding: chunked\r\n\r\n"
    )


@given(st.binary(min_size=1, max_size=3000))
def test_encode_chunk_roundtrip(data: bytes) -> None:
    enc = encode_chunk(data)
    size, _, rest = enc.partition(b"\r\n")
    assert int(size, 16) == len(data)
    assert rest == data + b"\r\n"


# --------------------------------------------------------------------------- response headers


def test_response_headers_filtered() -> None:
    rh = filter_response_headers(
        [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"close, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Keep-Alive", b"timeout=1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"12"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ]
    )
    assert rh.lines == [
        b"content-type: text/plain\r\n",
        b"set-cookie: a=1\r\n",
        b"set-cookie: b=2\r\n",
    ]
    assert rh.close and rh.chunked and rh.content_length == 12


@pytest.mark.parametrize(
    ("head", "status", "cl", "chunked", "expected"),
    [
        (True, 200, True, False, BodyFraming.NONE),
        (False, 204, True, False, BodyFraming.NONE),
        (False, 304, True, False, BodyFraming.NONE),
        (False, 100, False, False, BodyFraming.NONE),
        (False, 200, True, True, BodyFraming.CHUNKED),
        (False, 200, True, False, BodyFraming.LENGTH),
        (False, 200, False, False, BodyFraming.CLOSE),
    ],
)
def test_upstream_body_framing(
    head: bool, status: int, cl: bool, chunked: bool, expected: BodyFraming
) -> None:
    assert upstream_body_framing(head, status, cl, chunked) is expected


@pytest.mark.parametrize(
    ("upstream", "http11", "expected"),
    [
        (BodyFraming.NONE, True, (BodyFraming.NONE, False)),
        (BodyFraming.LENGTH, False, (BodyFraming.LENGTH, False)),
        (BodyFraming.CHUNKED, True, (BodyFraming.CHUNKED, False)),
        (BodyFraming.CHUNKED, False, (BodyFraming.CLOSE, True)),
        (BodyFraming.CLOSE, True, (BodyFraming.CHUNKED, False)),
        (BodyFraming.CLOSE, False, (BodyFraming.CLOSE, True)),
    ],
)
def test_downstream_body_framing(
    upstream: BodyFraming, http11: bool, expected: tuple[BodyFraming, bool]
) -> None:
    assert downstream_body_framing(upstream, http11) == expected


def test_response_head_serialization() -> None:
    head = response_head(200, True, [b"x: 1\r\n"], BodyFraming.LENGTH, 5, None)
    assert head == b"HTTP/1.1 200 OK\r\nx: 1\r\ncontent-length: 5\r\n\r\n"
    head = response_head(404, False, [], BodyFraming.CLOSE, None, b"close")
    assert head == b"HTTP/1.0 404 Not Found\r\nconnection: close\r\n\r\n"
    head = response_head(200, True, [], BodyFraming.CHUNKED, None, None)
    assert b"transfer-encoding: chunked\r\n" in head
    assert status_line(599, True) == b"HTTP/1.1 599 Unknown\r\n"


def test_local_reply_bytes() -> None:
    raw = local_reply_bytes(503, b"no healthy upstream")
    assert raw == (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
        b"content-length: 19\r\n\r\nno healthy upstream"
    )
    raw = local_reply_bytes(404, b"", close=True)
    assert raw == b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    raw = local_reply_bytes(418, b"tea", head_only=True, extra=[("location", "/x")])
    assert raw.endswith(b"location: /x\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\n")


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("failure", "status", "flag", "body"),
    [
        (Failure.NO_ROUTE, 404, "NR", b""),
        (Failure.NO_CLUSTER, 503, "NC", b""),
        (Failure.NO_HEALTHY_UPSTREAM, 503, "UH", b"no healthy upstream"),
        (
            Failure.CONNECT_FAILURE,
            503,
            "UF",
            b"upstream connect error or disconnect/reset before headers. "
            b"reset reason: connection failure",
        ),
        (
            Failure.UPSTREAM_RESET,
            503,
            "UC",
            b"upstream connect error or disconnect/reset before headers. "
            b"reset reason: connection termination",
        ),
        (Failure.UPSTREAM_TIMEOUT, 504, "UT", b"upstream request timeout"),
        (Failure.BAD_REQUEST, 400, "DPE", b"Bad Request"),
        (Failure.HEADERS_TOO_LARGE, 431, "DPE", b"Request Header Fields Too Large"),
        (Failure.HEAD_TIMEOUT, 408, "DPE", b"request timeout"),
    ],
)
def test_failure_mapping(failure: Failure, status: int, flag: str, body: bytes) -> None:
    reply = local_reply(failure)
    assert (reply.status, reply.flag, reply.body) == (status, flag, body)
    assert failure.flag == flag


def test_every_failure_is_mapped_and_protocol_errors_close() -> None:
    for failure in Failure:
        reply = local_reply(failure)
        assert 400 <= reply.status < 600
        closing = {
            "BAD_REQUEST",
            "HEADERS_TOO_LARGE",
            "HEAD_TIMEOUT",
            "INTERNAL",
            "STREAM_IDLE",
            "NOT_IMPLEMENTED",
        }
        assert reply.close == (failure.name in closing)
