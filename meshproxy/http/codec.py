"""HTTP/1.x codec pieces that need no socket: header filtering, framing decisions, serialization.

Theory of operation
-------------------
The byte-level parsing is llhttp's (through ``httptools``); this module holds the proxy's own
decisions about what it parsed, as pure functions the connection protocols call:

* :func:`parse_target` splits a request target (origin-form ``/p?q``, absolute-form
  ``http://host:port/p``, ``*``) into scheme, authority and origin-form path.
* :func:`split_authority` turns ``Host`` / URL authority into (lower-case host, port).
* :func:`prepare_request_headers` makes the upstream header list in one pass: hop-by-hop headers
  and every header named in ``Connection`` dropped, ``Host`` set, ``x-forwarded-for`` appended,
  ``x-forwarded-proto`` / ``x-request-id`` added when absent, ``x-envoy-attempt-count`` set.
* :func:`filter_response_headers` does the same for an upstream response head (bytes in, bytes
  out: the hot path does not decode response headers) and reports its framing.
* :func:`upstream_body_framing` / :func:`downstream_body_framing` decide how a response body is
  delimited on each side (``HEAD``/1xx/204/304 have none; close-delimited bodies are re-framed as
  chunked for HTTP/1.1 clients and close-delimited for HTTP/1.0 clients).
* :func:`response_head` / :func:`local_reply_bytes` serialize, with header names lower-case as
  Envoy sends them.

Everything here is deterministic except :func:`new_request_id` (``os.urandom``).
"""

from __future__ import annotations

import enum
import http
import os
from collections.abc import Iterable

# Hop-by-hop headers: RFC 9110 7.6.1 plus the de-facto ones Envoy strips
# (``proxy-connection``, ``keep-alive``, ``http2-settings``). ``proxy-authorization`` is consumed
# by the proxy the client addressed (this one, with ``http_proxy=``).
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "http2-settings",
    }
)
HOP_BY_HOP_BYTES: frozenset[bytes] = frozenset(h.encode() for h in HOP_BY_HOP)

# Headers a ``Connection`` token may not remove: framing and routing depend on them.
_PROTECTED: frozenset[str] = frozenset({"host", "content-length"})
# Headers the proxy sets itself on the upstream request (client values replaced or merged).
_OWN_REQUEST = frozenset(
    {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "x-envoy-attempt-count",
        "expect",
        "content-length",
    }
)


class BodyFraming(enum.IntEnum):
    """How a message body is delimited."""

    NONE = 0  # no body at all
    LENGTH = 1  # Content-Length
    CHUNKED = 2  # Transfer-Encoding: chunked
    CLOSE = 3  # read until the connection closes (responses only)


# --------------------------------------------------------------------------- request side


def new_request_id() -> str:
    """A random (version 4) UUID string, without the cost of ``uuid.uuid4()``."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TargetError(ValueError):
    """The request target is not origin-form, absolute-form http(s) or ``*``."""


def parse_target(url: str) -> tuple[str | None, str | None, str]:
    """Split a request target into (scheme, authority, origin-form path).

    Origin-form (``/a?b``) gives ``(None, None, "/a?b")``; absolute-form
    ``http://Reviews:9080/x?y`` gives ``("http", "Reviews:9080", "/x?y")`` (an empty path becomes
    ``/``); ``*`` (``OPTIONS *``) is kept as the path. Anything else raises :class:`TargetError`.
    """
    if url.startswith("/"):
        return None, None, url
    if url == "*":
        return None, None, "*"
    sep = url.find("://")
    if sep <= 0:
        raise TargetError(url)
    scheme = url[:sep].lower()
    if scheme not in ("http", "https"):
        raise TargetError(url)
    rest = url[sep + 3 :]
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if i != -1 and i < end:
            end = i
    authority = rest[:end]
    if not authority or "@" in authority:
        raise TargetError(url)
    path = rest[end:]
    hash_at = path.find("#")
    if hash_at != -1:
        path = path[:hash_at]
    if not path.startswith("/"):
        path = "/" + path
    return scheme, authority, path


def split_authority(authority: str) -> tuple[str, int | None]:
    """``"Reviews:9080"`` -> ``("reviews", 9080)``; ``"[::1]:80"`` -> ``("::1", 80)``.

    A missing or non-numeric port gives ``None``; the host is lower-cased and loses a trailing
    dot (``example.com.`` and ``example.com`` are the same host)."""
    port: int | None = None
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            return authority.lower(), None
        host = authority[1:close]
        rest = authority[close + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        return host.lower(), port
    colon = authority.rfind(":")
    if colon != -1 and authority.count(":") == 1:
        p = authority[colon + 1 :]
        host = authority[:colon]
        if p.isdigit():
            port = int(p)
    else:
        host = authority
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    return host, port


def connection_tokens(value: str) -> list[str]:
    """Header names listed in a ``Connection`` header value, lower-case."""
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def prepare_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    host: str,
    client_ip: str,
    scheme: str,
    request_id: str | None,
    attempt: int = 1,
) -> tuple[list[tuple[str, str]], str]:
    """The header list to send upstream, and the request id it carries.

    ``headers`` have lower-case names. Drops hop-by-hop headers, headers named in
    ``Connection``, ``Expect`` (the proxy answers ``100 Continue`` itself) and
    ``Content-Length`` (the caller re-adds it from the framing it chose). ``x-request-id`` is
    kept when present (``request_id`` is then ignored) else ``request_id`` — or a new one when
    that is ``None``.
    """
    dropped: set[str] | None = None
    xff: str | None = None
    xfp: str | None = None
    rid: str | None = None
    out: list[tuple[str, str]] = [("host", host)]
    pending: list[tuple[str, str]] = []
    for name, value in headers:
        if name in HOP_BY_HOP:
            if name == "connection":
                for tok in connection_tokens(value):
                    if tok not in _PROTECTED:
                        if dropped is None:
                            dropped = set()
                        dropped.add(tok)
            continue
        if name in _OWN_REQUEST:
            if name == "x-forwarded-for":
                xff = value if xff is None else f"{xff},{value}"
            elif name == "x-forwarded-proto":
                if xfp is None:
                    xfp = value
            elif name == "x-request-id":
                if rid is None:
                    rid = value
            continue
        pending.append((name, value))
    if dropped:
        pending = [(n, v) for n, v in pending if n not in dropped]
        if "x-forwarded-for" in dropped:
            xff = None
        if "x-forwarded-proto" in dropped:
            xfp = None
        if "x-request-id" in dropped:
            rid = None
    out.extend(pending)
    if rid is None:
        rid = request_id if request_id is not None else new_request_id()
    out.append(("x-forwarded-for", client_ip if xff is None else f"{xff}, {client_ip}"))
    out.append(("x-forwarded-proto", scheme if xfp is None else xfp))
    out.append(("x-request-id", rid))
    out.append(("x-envoy-attempt-count", str(attempt)))
    return out, rid


def request_head(
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    framing: BodyFraming,
    content_length: int | None,
) -> bytes:
    """Serialize an HTTP/1.1 request head for the upstream."""
    parts = [f"{method} {path} HTTP/1.1\r\n"]
    for n, v in headers:
        parts.append(f"{n}: {v}\r\n")
    if framing is BodyFraming.LENGTH:
        parts.append(f"content-length: {content_length}\r\n")
    elif framing is BodyFraming.CHUNKED:
        parts.append("transfer-encoding: chunked\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (``data`` must not be empty)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


# --------------------------------------------------------------------------- response side


def upstream_body_framing(
    head_request: bool, status: int, content_length: bool, chunked: bool
) -> BodyFraming:
    """How the upstream delimits this response's body (RFC 9112 6.3)."""
    if head_request or status < 200 or status == 204 or status == 304:
        return BodyFraming.NONE
    if chunked:
        return BodyFraming.CHUNKED
    if content_length:
        return BodyFraming.LENGTH
    return BodyFraming.CLOSE


def downstream_body_framing(upstream: BodyFraming, client_http11: bool) -> tuple[BodyFraming, bool]:
    """(framing towards the client, whether the client connection must close after it).

    Chunked and close-delimited upstream bodies go chunked to HTTP/1.1 clients; an HTTP/1.0
    client cannot read chunked, so it gets a close-delimited body and the connection closes.
    """
    if upstream is BodyFraming.NONE or upstream is BodyFraming.LENGTH:
        return upstream, False
    if client_http11:
        return BodyFraming.CHUNKED, False
    return BodyFraming.CLOSE, True


class ResponseHead:
    """An upstream response head after filtering (see :func:`filter_response_headers`)."""

    __slots__ = ("chunked", "close", "content_length", "lines")

    def __init__(self) -> None:
        self.lines: list[bytes] = []  # b"name: value\r\n", name lower-case
        self.content_length: int | None = None
        self.chunked = False
        self.close = False  # upstream said Connection: close


def filter_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> ResponseHead:
    """Drop hop-by-hop (and ``Connection``-named) headers from an upstream response head.

    ``Content-Length`` is reported separately (and left out of ``lines``); the caller re-adds
    it when the downstream framing keeps it."""
    rh = ResponseHead()
    lines = rh.lines
    dropped: set[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP_BYTES:
            if lname == b"connection":
                for tok in value.lower().split(b","):
                    tok = tok.strip()
                    if tok == b"close":
                        rh.close = True
                    elif tok and tok != b"keep-alive" and tok != b"content-length":
                        if dropped is None:
                            dropped = set()
                        dropped.add(tok)
            elif lname == b"transfer-encoding":
                if value.lower().rstrip().endswith(b"chunked"):
                    rh.chunked = True
            continue
        if lname == b"content-length":
            try:
                rh.content_length = int(value)
            except ValueError:
                rh.content_length = None
            continue
        lines.append(lname + b": " + value + b"\r\n")
    if dropped:
        rh.lines = [ln for ln in lines if ln.split(b":", 1)[0] not in dropped]
    return rh


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_STATUS_LINES: dict[tuple[int, bool], bytes] = {}


def status_line(status: int, http11: bool) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n`` (reason phrases are the proxy's own, as Envoy's are)."""
    key = (status, http11)
    line = _STATUS_LINES.get(key)
    if line is None:
        ver = "HTTP/1.1" if http11 else "HTTP/1.0"
        line = f"{ver} {status} {_reason(status)}\r\n".encode("latin-1")
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[key] = line
    return line


def response_head(
    status: int,
    http11: bool,
    lines: Iterable[bytes],
    framing: BodyFraming,
    content_length: int | None,
    connection: bytes | None,
) -> bytes:
    """Serialize a response head for the client. ``connection`` is ``b"close"``,
    ``b"keep-alive"`` (HTTP/1.0 keep-alive) or ``None`` (omit the header)."""
    parts = [status_line(status, http11)]
    parts.extend(lines)
    if framing is BodyFraming.LENGTH and content_length is not None:
        parts.append(b"content-length: %d\r\n" % content_length)
    elif framing is BodyFraming.CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    if connection is not None:
        parts.append(b"connection: " + connection + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def local_reply_bytes(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain",
    http11: bool = True,
    close: bool = False,
    keep_alive_10: bool = False,
    extra: Iterable[tuple[str, str]] = (),
    head_only: bool = False,
) -> bytes:
    """A complete local response (head and body), as Envoy frames its local replies:
    ``content-length`` always, ``content-type`` only with a body."""
    parts = [status_line(status, http11)]
    for n, v in extra:
        parts.append(f"{n}: {v}\r\n".encode("latin-1"))
    if body:
        parts.append(f"content-type: {content_type}\r\n".encode("latin-1"))
    parts.append(b"content-length: %d\r\n" % len(body))
    if close:
        parts.append(b"connection: close\r\n")
    elif keep_alive_10:
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    if body and not head_only:
        parts.append(body)
    return b"".join(parts)


def lines_to_pairs(lines: Iterable[bytes]) -> list[tuple[str, str]]:
    """``b"name: value\\r\\n"`` lines -> ``(name, value)`` strings (for header operations)."""
    out = []
    for ln in lines:
        n, _, v = ln[:-2].partition(b":")
        out.append((n.decode("latin-1"), v.strip().decode("latin-1")))
    return out


def pairs_to_lines(pairs: Iterable[tuple[str, str]]) -> list[bytes]:
    return [f"{n.lower()}: {v}\r\n".encode("latin-1") for n, v in pairs]
