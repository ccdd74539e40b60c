"""Typed outcomes of a request, mapped once to an HTTP status, response flag and local body.

Theory of operation
-------------------
Every way a request can end without an upstream response is a :class:`Failure` member. The
codec, the router and the upstream attempt report *what happened* (a ``Failure``), never a
status code; :func:`local_reply` is the single place that turns it into what Envoy would send
(status, ``response_flags`` value, body, content-type) so the access log, the metrics and the
client all agree. Flags gathered on the way (``DI`` for a fault delay, ``URX`` when retries are
exhausted, ``UO`` when the retry budget refused a retry) are merged with the final one by
:func:`join_flags` in Envoy's order.

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
    TLS_FAILURE = "UFTLS"  # the upstream TLS handshake or the peer identity check failed
    UPSTREAM_RESET = "UC"  # upstream closed before the response head arrived
    UPSTREAM_PROTOCOL_ERROR = "UPE"  # upstream sent something that is not HTTP/1.x
    UPSTREAM_TIMEOUT = "UT"  # route timeout / per-try timeout
    OVERFLOW = "UO"  # connection-pool overflow
    RETRIES_EXHAUSTED = "URX"  # retries exhausted
    BAD_REQUEST = "DPE"  # downstream protocol error: malformed request
    HEADERS_TOO_LARGE = "DPE431"  # request head over the size / count limit
    HEAD_TIMEOUT = "DPE408"  # request head not received in time (slowloris)
    STREAM_IDLE = "SI"  # no byte either way for Settings.stream_idle_timeout
    NOT_IMPLEMENTED = "DPE501"  # a request transfer-coding other than chunked
    INTERNAL = "INTERNAL"  # a bug in the proxy (logged with its traceback)
    RBAC_DENIED = "RBAC"  # an AuthorizationPolicy denied the request (inbound)

    @property
    def flag(self) -> str:
        """The short response flag used in access logs and the ``response_flags`` label."""
        return _FLAGS[self]


_FLAGS: dict[Failure, str] = {
    Failure.NO_ROUTE: "NR",
    Failure.NO_CLUSTER: "NC",
    Failure.NO_HEALTHY_UPSTREAM: "UH",
    Failure.CONNECT_FAILURE: "UF",
    Failure.TLS_FAILURE: "UF",
    Failure.UPSTREAM_RESET: "UC",
    Failure.UPSTREAM_PROTOCOL_ERROR: "UPE",
    Failure.UPSTREAM_TIMEOUT: "UT",
    Failure.OVERFLOW: "UO",
    Failure.RETRIES_EXHAUSTED: "URX",
    Failure.BAD_REQUEST: "DPE",
    Failure.HEADERS_TOO_LARGE: "DPE",
    Failure.HEAD_TIMEOUT: "DPE",
    Failure.STREAM_IDLE: "SI",
    Failure.NOT_IMPLEMENTED: "DPE",
    Failure.INTERNAL: "-",
    Failure.RBAC_DENIED: "-",  # Envoy's RBAC filter sets no flag, only response code details
}


# Envoy's response flag order (CoreResponseFlag in stream_info.h): a request with several
# flags shows them in this order, comma-separated ("UF,URX", "DI,FI").
_FLAG_ORDER = {
    f: i
    for i, f in enumerate(
        "LH UH UT LR UR UF UC UO NR DI FI RL UAEX RLSE DC URX SI IH DPE UMSDR RFCF NFCF DT "
        "UPE NC OM DF DO DR".split()
    )
}


def join_flags(gathered: list[str], final: str) -> str:
    """``final`` (one flag, ``-`` or a comma list) merged with the flags ``gathered`` on the
    way (fault delay, retry limit, retry overflow), in Envoy's order, without repeats."""
    flags = set(gathered)
    if final and final != "-":
        flags.update(final.split(","))
    if not flags:
        return "-"
    return ",".join(sorted(flags, key=lambda f: (_FLAG_ORDER.get(f, 99), f)))


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
    Failure.TLS_FAILURE: LocalReply(
        503, "UF", _RESET_PREFIX + b"connection failure, transport failure reason: TLS error"
    ),
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
    Failure.STREAM_IDLE: LocalReply(408, "SI", b"stream timeout", close=True),
    Failure.NOT_IMPLEMENTED: LocalReply(501, "DPE", b"Not Implemented", close=True),
    Failure.INTERNAL: LocalReply(500, "-", b"internal error", close=True),
    Failure.RBAC_DENIED: LocalReply(403, "-", b"RBAC: access denied"),
}


_RETRIED_PREFIX = (
    b"upstream connect error or disconnect/reset before headers. retried and the latest "
    b"reset reason: "
)
# after retries, Envoy's body says so ("retried and the latest reset reason: ...")
_RETRIED: dict[Failure, LocalReply] = {
    f: LocalReply(r.status, r.flag, _RETRIED_PREFIX + r.body[len(_RESET_PREFIX) :])
    for f, r in _REPLIES.items()
    if r.body.startswith(_RESET_PREFIX)
}


def local_reply(failure: Failure, retried: bool = False) -> LocalReply:
    """The one mapping from an outcome to Envoy's status code, response flag and body
    (``retried``: the request was retried before this failure)."""
    if retried:
        r = _RETRIED.get(failure)
        if r is not None:
            return r
    return _REPLIES[failure]


class ProtocolError(Exception):
    """A downstream request that cannot be served (malformed, too large). Never a traceback:
    the codec catches it and answers with :func:`local_reply` of :attr:`failure`."""

    def __init__(self, failure: Failure, detail: str = "") -> None:
        super().__init__(detail or failure.name)
        self.failure = failure
        self.detail = detail
