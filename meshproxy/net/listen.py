"""Listening sockets: the only place the data plane binds.

Theory of operation
-------------------
:func:`listen` binds a TCP listener for an ``asyncio.Protocol`` factory on an IPv4 or IPv6
literal (``"::1"`` or ``"[::1]"``) or a host name, optionally with ``SO_REUSEPORT`` so that
several worker processes share one port, and returns the server with the address it actually
bound (port 0 lets the OS choose). Accepting stops with ``server.close()``; connections
already accepted are not touched by that (the data plane drains them itself).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

BACKLOG = 1024


def strip_brackets(host: str) -> str:
    """``"[::1]"`` -> ``"::1"``; anything else unchanged."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


async def listen(
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
) -> tuple[asyncio.Server, tuple[str, int]]:
    """Start accepting on ``host:port``; returns the server and its bound (host, port)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory,
        strip_brackets(host),
        port,
        reuse_port=reuse_port or None,
        backlog=BACKLOG,
        family=socket.AF_UNSPEC,
    )
    sockname = server.sockets[0].getsockname()
    return server, (str(sockname[0]), int(sockname[1]))
