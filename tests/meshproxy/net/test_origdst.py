"""SO_ORIGINAL_DST: sockaddr decoding, and "not redirected" on ordinary sockets.

The redirected case (a real iptables REDIRECT) is exercised in network namespaces by
tests/integration/test_capture_netns.py.
"""

from __future__ import annotations

import socket
import struct

import pytest

from meshproxy.net.origdst import SO_ORIGINAL_DST, SOL_IPV6, original_dst, parse_sockaddr


def sockaddr_in(ip: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_pton(socket.AF_INET, ip)
        + b"\0" * 8
    )


def sockaddr_in6(ip: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!H", port)
        + b"\0" * 4  # flowinfo
        + socket.inet_pton(socket.AF_INET6, ip)
        + b"\0" * 4  # scope id
    )


def test_parse_ipv4() -> None:
    assert parse_sockaddr(sockaddr_in("10.96.0.10", 80)) == ("10.96.0.10", 80)
    assert parse_sockaddr(sockaddr_in("192.168.1.2", 65535)) == ("192.168.1.2", 65535)


def test_parse_ipv6() -> None:
    assert parse_sockaddr(sockaddr_in6("fd00::a", 8080)) == ("fd00::a", 8080)


def test_parse_rejects_other_families_and_short_buffers() -> None:
    assert parse_sockaddr(b"") is None
    assert parse_sockaddr(b"\x01\x00\x00\x50") is None
    unix = struct.pack("=H", socket.AF_UNIX) + b"\0" * 14
    assert parse_sockaddr(unix) is None
    assert parse_sockaddr(sockaddr_in6("fd00::a", 1)[:20]) is None  # truncated v6


class FakeSock:
    """A socket whose getsockopt answers what a redirected one would."""

    def __init__(self, family: int, raw: bytes | OSError, local: tuple[str, int]) -> None:
        self.family = family
        self.raw = raw
        self.local = local
        self.asked: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        self.asked.append((level, option, buflen))
        if isinstance(self.raw, OSError):
            raise self.raw
        return self.raw

    def getsockname(self) -> tuple[str, int]:
        return self.local


def test_redirected_ipv4_asks_sol_ip_80() -> None:
    s = FakeSock(socket.AF_INET, sockaddr_in("10.96.0.10", 80), ("127.0.0.1", 15001))
    assert original_dst(s) == ("10.96.0.10", 80)
    assert s.asked == [(socket.SOL_IP, SO_ORIGINAL_DST, 16)]


def test_redirected_ipv6_asks_sol_ipv6_80() -> None:
    s = FakeSock(socket.AF_INET6, sockaddr_in6("fd00::a", 80), ("::1", 15001))
    assert original_dst(s) == ("fd00::a", 80)
    assert s.asked == [(SOL_IPV6, SO_ORIGINAL_DST, 28)]


def test_own_address_is_not_a_redirection() -> None:
    # conntrack tracks un-NATed connections too: the "original" destination is then ourselves
    s = FakeSock(socket.AF_INET, sockaddr_in("127.0.0.1", 15001), ("127.0.0.1", 15001))
    assert original_dst(s) is None


def test_errors_mean_not_redirected() -> None:
    s = FakeSock(socket.AF_INET, OSError(2, "No such file or directory"), ("127.0.0.1", 1))
    assert original_dst(s) is None
    s = FakeSock(socket.AF_INET, OSError(92, "Protocol not available"), ("127.0.0.1", 1))
    assert original_dst(s) is None
    assert original_dst(None) is None


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_real_unredirected_socket_is_none(family: int, host: str) -> None:
    """A real accepted loopback connection that no rule redirected: ENOENT (or, with
    conntrack tracking it, our own address) -> None."""
    try:
        srv = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        pytest.skip(f"no {family.name} sockets here")
    with srv:
        try:
            srv.bind((host, 0))
        except OSError:
            pytest.skip(f"{host} is not configured here")
        srv.listen(1)
        with socket.create_connection(srv.getsockname()[:2]) as cli:
            conn, _ = srv.accept()
            with conn:
                assert original_dst(conn) is None
                assert original_dst(cli) is None  # the client side was never redirected either
