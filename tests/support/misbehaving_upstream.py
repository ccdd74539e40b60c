"""Scripted misbehaving upstreams for resilience tests: status sequences, delays, resets,
slow bodies and closed ports, on 127.0.0.1 with OS-chosen ports.

Theory of operation
-------------------
:class:`Script` is a handler for the shared :class:`tests.support.upstream.UpstreamServer`: it
answers the n-th request it sees *for a key* (by default the request path, so one upstream can
serve several independent scenarios) with the n-th :class:`Reply` of its sequence, and keeps
answering with the last one once the sequence is used up. The ``Reply`` fields already cover
every misbehaviour: ``status``, ``delay`` (before the head), ``reset`` / ``silent_close`` (before
the head), ``raw`` + ``raw_reset`` (a head, part of a body, then a reset), ``chunks`` +
``chunk_delay`` (a slow body). The helpers below build those replies by name so a test reads as
its scenario. :func:`closed_port` gives a port nothing listens on (bound, then released).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from tests.support.upstream import Handler, Recorded, Reply, UpstreamServer


class Script:
    """Answer the n-th request per key with ``replies[n]`` (the last reply repeats)."""

    def __init__(
        self, replies: Sequence[Reply], key: Callable[[Recorded], str] = lambda r: r.target
    ) -> None:
        if not replies:
            raise ValueError("a script needs at least one reply")
        self.replies = list(replies)
        self.key = key
        self.seen: dict[str, int] = {}

    def __call__(self, req: Recorded) -> Reply:
        k = self.key(req)
        n = self.seen.get(k, 0)
        self.seen[k] = n + 1
        return self.replies[min(n, len(self.replies) - 1)]

    def __repr__(self) -> str:
        return f"Script(replies={len(self.replies)}, seen={self.seen})"


def status(code: int, delay: float = 0.0, body: bytes = b"") -> Reply:
    """A complete response with ``code`` (after ``delay`` seconds); the body names the code."""
    return Reply(status=code, reason="X", body=body or f"status {code}".encode(), delay=delay)


def reset_before_head(delay: float = 0.0) -> Reply:
    """The connection is reset (RST) without a byte of response."""
    return Reply(reset=True, delay=delay)


def reset_after_head(declared: int = 1000, sent: bytes = b"partial") -> Reply:
    """A 200 head declaring ``declared`` body bytes, ``sent`` of them, then a reset."""
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n".encode()
    return Reply(raw=head + sent, raw_reset=True)


def slow_body(chunks: int, every: float, piece: bytes = b"x" * 64) -> Reply:
    """A 200 whose head comes at once and whose chunked body trickles: ``chunks`` pieces,
    ``every`` seconds apart."""
    return Reply(chunks=[piece] * chunks, chunk_delay=every)


def closed_port() -> int:
    """A 127.0.0.1 port that was free a moment ago and has no listener now (connect fails)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start(handler: Handler | Reply) -> UpstreamServer:
    """A started upstream answering per ``handler``."""
    return await UpstreamServer(handler).start()
