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
from collections.abc import Collection, Iterable, Sequence

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


class RequestIds:
    """Unique ``x-request-id`` values that look like (version 4, RFC 4122 variant) UUIDs.

    Formatting a fresh random UUID costs more than the rest of a request's header work, so
    ids come in batches: each batch draws 16 random bytes for a prefix (the first 20 hex
    digits, with the version and variant digits in place) and a random start for the last 12
    hex digits, which then count up. Ids are unique within the process (the counter never
    wraps inside a batch) and across processes and batches by the 76 random prefix bits.
    """

    __slots__ = ("_end", "_n", "_prefix")

    BATCH = 1 << 16

    def __init__(self) -> None:
        self._prefix = b""
        self._n = 0
        self._end = 0  # the first call draws a batch

    def next(self) -> bytes:
        n = self._n
        if n >= self._end:
            n = self._new_batch()
        self._n = n + 1
        return self._prefix + b"%012x" % n

    def _new_batch(self) -> int:
        r = os.urandom(16)
        h = r.hex()
        self._prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-".encode()
        start = int.from_bytes(r[10:]) % ((1 << 48) - self.BATCH)
        self._end = start + self.BATCH
        return start


# RFC 4122 variant: the top two bits of the 17th hex digit are 10.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}

REQUEST_IDS = RequestIds()
next_request_id = REQUEST_IDS.next
os.register_at_fork(after_in_child=lambda: REQUEST_IDS.__init__())


def new_request_id() -> str:
    """A fresh request id (see :class:`RequestIds`) as ``str``."""
    return next_request_id().decode("ascii")


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


def _bytes_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


# Request headers that need a decision (everything else is forwarded as is).
_SPECIAL_REQUEST: frozenset[bytes] = HOP_BY_HOP_BYTES | frozenset(
    {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-request-id",
        b"x-envoy-attempt-count",
        b"expect",
        b"content-length",
    }
)
_PROTECTED_BYTES = frozenset({b"host", b"content-length"})


class UpstreamRequest:
    """An upstream request head being built (see :func:`upstream_request`)."""

    __slots__ = ("headers", "request_id")

    def __init__(self, headers: list[tuple[bytes, bytes]], request_id: bytes) -> None:
        self.headers = headers  # lower-case names, every header the upstream will get
        self.request_id = request_id


def upstream_request(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    host: str,
    client_ip: str,
    scheme: str,
    attempt: int = 1,
) -> UpstreamRequest:
    """The headers to send upstream (names lower-case, bytes).

    Drops hop-by-hop headers, headers named in ``Connection``, ``Expect`` (the proxy answers
    ``100 Continue`` itself) and ``Content-Length`` (re-added from the chosen framing by
    :func:`request_head`). Sets ``host``; appends the client to ``x-forwarded-for``; adds
    ``x-forwarded-proto`` and ``x-request-id`` (uuid4) when absent, keeping the client's
    values when present; sets ``x-envoy-attempt-count``.
    """
    dropped: list[bytes] | None = None
    xff: bytes | None = None
    xfp: bytes | None = None
    rid: bytes | None = None
    kept: list[tuple[bytes, bytes]] = [(b"host", host.encode("latin-1"))]
    special = _SPECIAL_REQUEST
    for hv in headers:
        name = hv[0]
        if name in special:
            value = hv[1]
            if name == b"connection":
                for tok in _bytes_tokens(value):
                    if tok not in _PROTECTED_BYTES:
                        if dropped is None:
                            dropped = []
                        dropped.append(tok)
            elif name == b"x-forwarded-for":
                xff = value if xff is None else xff + b"," + value
            elif name == b"x-forwarded-proto":
                if xfp is None:
                    xfp = value
            elif name == b"x-request-id":
                if rid is None:
                    rid = value
            continue
        kept.append(hv)
    if dropped:
        gone = set(dropped)
        kept = [hv for hv in kept if hv[0] not in gone]
        if b"x-forwarded-for" in gone:
            xff = None
        if b"x-forwarded-proto" in gone:
            xfp = None
        if b"x-request-id" in gone:
            rid = None
    ip = client_ip.encode("latin-1")
    if rid is None:
        rid = next_request_id()
    kept.append((b"x-forwarded-for", ip if xff is None else xff + b", " + ip))
    kept.append((b"x-forwarded-proto", scheme.encode("latin-1") if xfp is None else xfp))
    kept.append((b"x-request-id", rid))
    kept.append((b"x-envoy-attempt-count", b"%d" % attempt))
    return UpstreamRequest(kept, rid)


def build_request_head(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    *,
    host: bytes,
    client_ip: bytes,
    scheme: bytes,
    framing: BodyFraming,
    content_length: int | None,
    drop: Collection[bytes] | None = None,
    attempt: int = 1,
) -> tuple[bytes, bytes]:
    """:func:`upstream_request` and :func:`request_head` in one pass, for requests without
    header operations: (the serialized upstream request head, its ``x-request-id``).

    ``drop`` holds the header names the client's ``Connection`` header listed (the caller
    already knows them from parsing); the result is byte-for-byte what the two-step path gives.
    """
    xff: bytes | None = None
    xfp: bytes | None = None
    rid: bytes | None = None
    parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    special = _SPECIAL_REQUEST
    for name, value in headers:
        if name in special:
            if name == b"x-forwarded-for":
                xff = value if xff is None else xff + b"," + value
            elif name == b"x-forwarded-proto":
                if xfp is None:
                    xfp = value
            elif name == b"x-request-id":
                if rid is None:
                    rid = value
            continue
        if drop and name in drop:
            continue
        parts += (name, b": ", value, b"\r\n")
    if drop:
        if b"x-forwarded-for" in drop:
            xff = None
        if b"x-forwarded-proto" in drop:
            xfp = None
        if b"x-request-id" in drop:
            rid = None
    if rid is None:
        rid = next_request_id()
    parts += (
        b"x-forwarded-for: ",
        client_ip if xff is None else xff + b", " + client_ip,
        b"\r\nx-forwarded-proto: ",
        scheme if xfp is None else xfp,
        b"\r\nx-request-id: ",
        rid,
        b"\r\nx-envoy-attempt-count: 1\r\n"
        if attempt == 1
        else b"\r\nx-envoy-attempt-count: %d\r\n" % attempt,
    )
    if framing is BodyFraming.LENGTH:
        parts.append(b"content-length: %d\r\n\r\n" % (content_length or 0))
    elif framing is BodyFraming.CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts), rid


def prepare_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    host: str,
    client_ip: str,
    scheme: str,
    attempt: int = 1,
) -> tuple[list[tuple[str, str]], str]:
    """:func:`upstream_request` for ``str`` headers: (headers, request id)."""
    ur = upstream_request(
        [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers],
        host=host,
        client_ip=client_ip,
        scheme=scheme,
        attempt=attempt,
    )
    return bytes_to_pairs(ur.headers), ur.request_id.decode("latin-1")


def bytes_to_pairs(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


def header_bytes(text: str) -> bytes:
    """A header name or value from configuration as bytes: latin-1 (what it was decoded from,
    for request-derived values), else UTF-8 (a non-latin-1 value written in the config, as
    Envoy sends it)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def uri_bytes(uri: str) -> bytes:
    """A request target or ``Location`` from configuration as bytes: non-ASCII characters (and
    controls / spaces) percent-encoded from their UTF-8 form, as Envoy does."""
    if uri.isascii() and uri.isprintable() and " " not in uri:
        return uri.encode("ascii")
    return "".join(
        chr(b) if 0x20 < b < 0x7F else f"%{b:02X}" for b in uri.encode("utf-8", "replace")
    ).encode("ascii")


def pairs_to_bytes(pairs: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    try:
        return [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in pairs]
    except UnicodeEncodeError:
        return [(header_bytes(n.lower()), header_bytes(v)) for n, v in pairs]


def request_head(
    method: str,
    path: str,
    headers: Iterable[tuple[bytes, bytes]],
    framing: BodyFraming,
    content_length: int | None,
) -> bytes:
    """Serialize an HTTP/1.1 request head for the upstream."""
    try:
        line = f"{method} {path} HTTP/1.1\r\n".encode("latin-1")
    except UnicodeEncodeError:  # a rewrite from configuration
        line = b"%s %s HTTP/1.1\r\n" % (method.encode("latin-1"), uri_bytes(path))
    parts: list[bytes] = [line]
    for n, v in headers:
        parts += (n, b": ", v, b"\r\n")
    if framing is BodyFraming.LENGTH:
        parts.append(b"content-length: %d\r\n" % (content_length or 0))
    elif framing is BodyFraming.CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


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


# Response headers that need a decision: everything else is forwarded as ``name: value``.
RESPONSE_SPECIAL: frozenset[bytes] = HOP_BY_HOP_BYTES | {b"content-length"}


class ResponseHead:
    """An upstream response head being filtered, one header at a time (see
    :func:`filter_response_headers`); the upstream connection feeds it from the parser."""

    __slots__ = (
        "chunked",
        "close",
        "content_length",
        "dropped",
        "keep_alive",
        "lines",
        "other_coding",
    )

    def __init__(self) -> None:
        self.lines: list[bytes] = []  # b"name: value\r\n", name lower-case
        self.content_length: int | None = None
        self.chunked = False
        self.close = False  # upstream said Connection: close
        self.keep_alive = False  # upstream said Connection: keep-alive
        self.dropped: set[bytes] | None = None  # names its Connection header listed
        self.other_coding = False  # a transfer-coding other than chunked (not implemented)

    def add(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in RESPONSE_SPECIAL:
            self.add_special(lname, value)
        else:
            self.lines.append(lname + b": " + value + b"\r\n")

    def add_special(self, lname: bytes, value: bytes) -> None:
        """A hop-by-hop header or Content-Length (``lname`` lower-case): noted, not forwarded."""
        if lname == b"connection":
            for tok in value.lower().split(b","):
                tok = tok.strip()
                if tok == b"close":
                    self.close = True
                elif tok == b"keep-alive":
                    self.keep_alive = True
                elif tok and tok != b"content-length":
                    if self.dropped is None:
                        self.dropped = set()
                    self.dropped.add(tok)
        elif lname == b"transfer-encoding":
            # Only the final coding of the last header frames the body (RFC 9112 6.3).
            v = value.strip().lower()
            if v == b"chunked":
                self.chunked = True
            else:
                self.other_coding = True
                self.chunked = v.rsplit(b",", 1)[-1].strip() == b"chunked"
        elif lname == b"content-length":
            try:
                self.content_length = int(value)
            except ValueError:
                self.content_length = None

    def finish(self) -> list[bytes]:
        """The forwarded lines, without those named by the upstream's ``Connection``."""
        dropped = self.dropped
        if dropped:
            self.dropped = None
            self.lines = [ln for ln in self.lines if ln.split(b":", 1)[0] not in dropped]
        return self.lines


def filter_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> ResponseHead:
    """Drop hop-by-hop (and ``Connection``-named) headers from an upstream response head.

    ``Content-Length`` is reported separately (and left out of ``lines``); the caller re-adds
    it when the downstream framing keeps it."""
    rh = ResponseHead()
    for name, value in headers:
        rh.add(name, value)
    rh.finish()
    return rh


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


STATUS_LINES: dict[tuple[int, bool], bytes] = {}  # (status, http11) -> line, see status_line


def status_line(status: int, http11: bool) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n`` (reason phrases are the proxy's own, as Envoy's are)."""
    key = (status, http11)
    line = STATUS_LINES.get(key)
    if line is None:
        ver = "HTTP/1.1" if http11 else "HTTP/1.0"
        line = f"{ver} {status} {_reason(status)}\r\n".encode("latin-1")
        if len(STATUS_LINES) < 1024:
            STATUS_LINES[key] = line
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
        parts.append(header_bytes(n) + b": " + header_bytes(v) + b"\r\n")
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
    try:
        return [f"{n.lower()}: {v}\r\n".encode("latin-1") for n, v in pairs]
    except UnicodeEncodeError:
        return [header_bytes(n.lower()) + b": " + header_bytes(v) + b"\r\n" for n, v in pairs]
