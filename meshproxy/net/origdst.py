"""The original destination of a connection that iptables redirected to us (SO_ORIGINAL_DST).

Theory of operation
-------------------
``meshproxy capture`` installs ``REDIRECT`` rules in the nat table: an application's outbound
connection to ``10.96.0.10:80`` arrives on the outbound listener (``127.0.0.1:15001``), a peer's
connection to this pod's ``:8080`` on the inbound listener (``:15006``). The kernel's connection
tracking still knows where the client meant to go; ``getsockopt(SOL_IP, SO_ORIGINAL_DST)``
(``IP6T_SO_ORIGINAL_DST`` on ``SOL_IPV6`` for IPv6, both option number 80) returns it as a
``sockaddr_in`` / ``sockaddr_in6``, which :func:`parse_sockaddr` decodes.

"Not redirected" has several faces, all answered None by :func:`original_dst`: ``ENOENT`` (no
conntrack entry: nothing was NATed, or conntrack is not loaded), any other ``OSError`` (not
Linux, not a TCP/IP socket), and an original destination equal to the socket's own local
address (conntrack tracks connections that were not NATed too, and then reports the address the
client really used: treating it as a redirection would make a passthrough connect to itself).

One call per connection, by the listener that needs it (the outbound side lazily, on the first
request whose Host matches no route; the inbound side at accept): the failure path is one
system call and one caught exception, nothing per request.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

__all__ = ["SOL_IPV6", "SO_ORIGINAL_DST", "original_dst", "parse_sockaddr"]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (netfilter_ipv6) is 80 too
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_SOCKADDR_IN = 16  # sizeof(struct sockaddr_in)
_SOCKADDR_IN6 = 28  # sizeof(struct sockaddr_in6)
_AF_INET = int(socket.AF_INET)
_AF_INET6 = int(socket.AF_INET6)


class _Sock(Protocol):
    """What is needed of a socket: ``socket.socket`` and uvloop's ``PseudoSocket`` both do."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...

    def getsockname(self) -> object: ...


def parse_sockaddr(raw: bytes) -> tuple[str, int] | None:
    """``struct sockaddr_in`` / ``sockaddr_in6`` bytes -> ``(ip, port)``; None for anything
    else (another family, too short). The family is in host byte order, the port in network
    byte order."""
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw, 0)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == _AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == _AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return None


def original_dst(sock: _Sock | None) -> tuple[str, int] | None:
    """Where the client of the accepted ``sock`` meant to connect, if iptables redirected the
    connection to us; None when it was not redirected (see the module docstring)."""
    if sock is None:
        return None
    try:
        if sock.family == _AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6)
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
        dst = parse_sockaddr(raw)
        if dst is None:
            return None
        local = sock.getsockname()
    except OSError:
        return None
    if isinstance(local, tuple) and len(local) >= 2:
        ip = dst[0]
        own = str(local[0])
        if ip.startswith("::ffff:"):  # a v4-mapped original destination on a v6 socket
            ip = ip[7:]
        if own.startswith("::ffff:"):
            own = own[7:]
        if (ip, dst[1]) == (own, local[1]):
            return None
    return dst
