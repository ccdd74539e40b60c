"""parse_control_url and the status table (no sockets)."""

from __future__ import annotations

import pytest

from control.cli import format_status
from meshproxy.sources.stream import parse_control_url


@pytest.mark.parametrize(
    ("url", "base", "stream", "tls"),
    [
        (
            "http://127.0.0.1:15010",
            "http://127.0.0.1:15010",
            "ws://127.0.0.1:15010/v1/stream",
            False,
        ),
        ("https://cp.mesh:15012/", "https://cp.mesh:15012", "wss://cp.mesh:15012/v1/stream", True),
        ("ws://[::1]:9", "http://[::1]:9", "ws://[::1]:9/v1/stream", False),
        ("wss://h:1", "https://h:1", "wss://h:1/v1/stream", True),
        ("HTTP://h:1/v1/stream", "http://h:1", "ws://h:1/v1/stream", False),
    ],
)
def test_control_urls(url: str, base: str, stream: str, tls: bool) -> None:
    got = parse_control_url(url)
    assert (got.base, got.stream, got.tls) == (base, stream, tls)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://h:1", "scheme"),
        ("127.0.0.1:15010", "expected http"),
        ("http://:80", "host"),
        ("http://h:x", "port"),
        ("http://h:1/?a", "query"),
    ],
)
def test_bad_control_urls(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_control_url(url)


def test_status_table() -> None:
    status = {
        "version": "v2",
        "errors": ["mesh/a.yaml: VirtualService/x: spec.htp: unknown field"],
        "proxies": [
            {"node_id": "a", "namespace": "default", "status": "SYNCED", "acked_version": "v2",
             "expected_version": "v2", "connected_since": "2026-01-01T00:00:00.000Z",
             "nacked": None},
            {"node_id": "b", "namespace": "team", "status": "NACKED", "acked_version": "v1",
             "expected_version": "v2", "connected_since": "2026-01-01T00:59:00.000Z",
             "nacked": "cluster x: tls: caCertificates /x: No such file"},
        ],
    }  # fmt: skip
    out = format_status(status, now=1767229200.0).splitlines()  # 2026-01-01T01:00:00Z
    assert out[0] == "control plane version v2"
    assert out[1].split() == ["NODE", "NAMESPACE", "STATUS", "VERSION", "EXPECTED", "AGE"]
    assert out[2].split() == ["a", "default", "SYNCED", "v2", "v2", "1h0m"]
    assert out[3].split() == ["b", "team", "NACKED", "v1", "v2", "1m0s"]
    assert out[4] == "NACK b: cluster x: tls: caCertificates /x: No such file"
    assert out[5] == "1 config problem(s), not pushed:"
