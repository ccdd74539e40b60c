"""Typed outcomes of a request, mapped once to an HTTP status, response flag and local body.

Theory of operation
-------------------
Every way a request can end without an upstream response is a :class:`Failure` member. The
codec, the router and the upstream attempt report *what happened* (a ``Failure``), never a
status code; :func:`local_reply` is the single place that turns it into what Envoy would send
(status, ``response_flags`` value, body, content-type) so the access log, the metrics and the
client all agree. Retry / timeout / fault / circuit-breaking decisions (next issue) add members
here and consult :attr:`Failure.retriable_reason` without touching the proxy's plumbing.

Bodies and flags follow Envoy (``source/common/stream_info/utility.cc`` short flag names and
the router's ``upstream connect error or disconnect/reset before headers. reset reason: ...``
texts).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Failure(enum.Enum):
    """Why a request got a local reply instead of an upstream response."""

    NO_ROUTE = "NR"  # no virtual host / no route matched
    NO_CLUSTER = "NC"  # the route names a cluster the snapshot does not have
    NO_HEALTHY_UPSTREAM = "UH"  # cluster without endpoints / none available
    CONNECT_FAILURE = "UF"  # TCP connect refused / timed out
    UPSTREAM_RESET = "UC"  # upstream closed before the response head arrived
    UPSTREAM_PROTOCOL_ERROR = "UPE"  # upstream sent something that is not HTTP/1.x
    UPSTREAM_TIMEOUT = "UT"  # route timeout (next issue)
    OVERFLOW = "UO"  # connection-pool overflow (next issue)
    RETRIES_EXHAUSTED = "URX"  # retries exhausted (next issue)
    BAD_REQUEST = "DPE"  # downstream protocol error: malformed request
    HEADERS_TOO_LARGE = "DPE431"  # request head over the size / count limit
    HEAD_TIMEOUT = "DPE408"  # request head not received in time (slowloris)
    NOT_IMPLEMENTED = "DPE501"  # a request transfer-coding other than chunked
    INTERNAL = "INTERNAL"  # a bug in the proxy (logged with its traceback)

    @property
    def flag(self) -> str:
        """The short response flag used in access logs and the ``response_flags`` label."""
        return _FLAGS[self]


_FLAGS: dict[Failure, str] = {
    Failure.NO_ROUTE: "NR",
    Failure.NO_CLUSTER: "NC",
    Failure.NO_HEALTHY_UPSTREAM: "UH",
    Failure.CONNECT_FAILURE: "UF",
    Failure.UPSTREAM_RESET: "UC",
    Failure.UPSTREAM_PROTOCOL_ERROR: "UPE",
    Failure.UPSTREAM_TIMEOUT: "UT",
    Failure.OVERFLOW: "UO",
    Failure.RETRIES_EXHAUSTED: "URX",
    Failure.BAD_REQUEST: "DPE",
    Failure.HEADERS_TOO_LARGE: "DPE",
    Failure.HEAD_TIMEOUT: "DPE",
    Failure.NOT_IMPLEMENTED: "DPE",
    Failure.INTERNAL: "-",
}


@dataclass(frozen=True, slots=True)
class LocalReply:
    """What the proxy answers itself: status, flag, body and whether to close afterwards."""

    status: int
    flag: str
    body: bytes = b""
    content_type: str = "text/plain"
    close: bool = False


_RESET_PREFIX = b"upstream connect error or disconnect/reset before headers. reset reason: "

_REPLIES: dict[Failure, LocalReply] = {
    Failure.NO_ROUTE: LocalReply(404, "NR"),
    Failure.NO_CLUSTER: LocalReply(503, "NC"),
    Failure.NO_HEALTHY_UPSTREAM: LocalReply(503, "UH", b"no healthy upstream"),
    Failure.CONNECT_FAILURE: LocalReply(503, "UF", _RESET_PREFIX + b"connection failure"),
    Failure.UPSTREAM_RESET: LocalReply(503, "UC", _RESET_PREFIX + b"connection termination"),
    Failure.UPSTREAM_PROTOCOL_ERROR: LocalReply(503, "UPE", _RESET_PREFIX + b"protocol error"),
    Failure.UPSTREAM_TIMEOUT: LocalReply(504, "UT", b"upstream request timeout"),
    Failure.OVERFLOW: LocalReply(
        503,
        "UO",
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
    ),
    Failure.RETRIES_EXHAUSTED: LocalReply(503, "URX", _RESET_PREFIX + b"connection failure"),
    Failure.BAD_REQUEST: LocalReply(400, "DPE", b"Bad Request", close=True),
    Failure.HEADERS_TOO_LARGE: LocalReply(
        431, "DPE", b"Request Header Fields Too Large", close=True
    ),
    Failure.HEAD_TIMEOUT: LocalReply(408, "DPE", b"request timeout", close=True),
    Failure.NOT_IMPLEMENTED: LocalReply(501, "DPE", b"Not Implemented", close=True),
    Failure.INTERNAL: LocalReply(500, "-", b"internal error", close=True),
}


def local_reply(failure: Failure) -> LocalReply:
    """The one mapping from an outcome to Envoy's status code, response flag and body."""
    return _REPLIES[failure]


class ProtocolError(Exception):
    """A downstream request that cannot be served (malformed, too large). Never a traceback:
    the codec catches it and answers with :func:`local_reply` of :attr:`failure`."""

    def __init__(self, failure: Failure, detail: str = "") -> None:
        super().__init__(detail or failure.name)
        self.failure = failure
        self.detail = detail
